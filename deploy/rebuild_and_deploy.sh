#!/usr/bin/env bash
# Rebuild the p2plab images with Cloud Build and deploy the rendezvous and the workers to Cloud
# Run, with the network set-up UDP hole punching needs there (Direct VPC egress through a Cloud
# NAT with endpoint-independent mapping). Why each setting is there: docs/deploy.md.
#
# Settings come from the environment (see .envrc.example); `--dry-run` prints every command
# without running any of them (and needs no gcloud).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/rebuild_and_deploy.sh [--dry-run] [--skip-build] [--skip-network] [--env-file FILE]

Builds Dockerfile.rendezvous and Dockerfile.worker with Cloud Build into Artifact Registry,
creates (if missing) the VPC, subnets, Cloud Router and Cloud NAT the workers egress through,
deploys the rendezvous, reads its URL, and deploys one worker service per entry of
WORKER_REGIONS with RENDEZVOUS_URL=wss://<rendezvous host>.

  --dry-run        print every command instead of running it (no gcloud needed)
  --skip-build     deploy the images of IMAGE_TAG without rebuilding them
  --skip-network   do not check or create the VPC, subnets, router and NAT
  --env-file FILE  source FILE (e.g. .envrc) before reading the settings
  -h, --help       this help

Settings (environment variables, defaults in brackets):
  PROJECT_ID [iceberg-eli]          REGION [us-central1] (Artifact Registry and rendezvous)
  AR_REPO [p2plab]                  IMAGE_TAG [git short hash, else UTC time]
  RENDEZVOUS_SERVICE [p2plab-rendezvous]
  WORKER_SERVICE [p2plab-worker]    (services are named WORKER_SERVICE-1, -2, ...)
  WORKER_REGIONS ["us-central1 us-east1"] one worker service per entry
  NETWORK [p2plab-net]  SUBNET [p2plab-subnet]  SUBNET_RANGE_PREFIX [10.8] (10.8.<i>.0/24)
  ROUTER [p2plab-router]  NAT [p2plab-nat]  NAT_UDP_IDLE_TIMEOUT [120s]
  NAT_MIN_PORTS_PER_VM [128]
  STUN_SERVERS [stun.l.google.com:19302,stun1.l.google.com:19302]
  INTERNAL_UDP_PORT [40000]  P2P_ROOM [default]
  P2P_TOKEN [] ADMIN_TOKEN [] UI_TOKEN []  values for the secrets below: stored as a new
      version when set; when unset, a missing secret is created with a random value
  P2P_TOKEN_SECRET [p2plab-token]  ADMIN_TOKEN_SECRET [p2plab-admin-token]
  UI_TOKEN_SECRET [p2plab-ui-token]  Secret Manager secrets passed with --set-secrets
  RUN_SERVICE_ACCOUNT [] (default: the project's default compute service account) gets
      read access to those secrets
  RENDEZVOUS_MAX_WORKERS [1000] connections per rendezvous instance (MAX_WORKERS and Cloud
      Run --concurrency, at most 1000); memory is sized to it (about 42 KiB per connection)
  REDIS_URL [] (set: the rendezvous scales out and reaches Redis through the VPC)
  RENDEZVOUS_MAX_INSTANCES [1 without REDIS_URL, 3 with it]
  RENDEZVOUS_URL [] (set: use it instead of the deployed rendezvous' URL)
  ALLOW_UNAUTHENTICATED [1] (0: the services need IAM-authenticated callers)
EOF
}

DRY_RUN=0
SKIP_BUILD=0
SKIP_NETWORK=0
ENV_FILE=""
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        --skip-network) SKIP_NETWORK=1 ;;
        --env-file)
            [[ $# -ge 2 ]] || { echo "--env-file needs a file" >&2; exit 2; }
            ENV_FILE="$2"
            shift
            ;;
        --env-file=*) ENV_FILE="${1#--env-file=}" ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "unknown option: $1" >&2
            usage >&2
            exit 2
            ;;
    esac
    shift
done

if [[ -n "$ENV_FILE" ]]; then
    # shellcheck disable=SC1090
    source "$ENV_FILE"
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PROJECT_ID="${PROJECT_ID:-iceberg-eli}"
REGION="${REGION:-us-central1}"
AR_REPO="${AR_REPO:-p2plab}"
if [[ -z "${IMAGE_TAG:-}" ]]; then
    IMAGE_TAG="$(git rev-parse --short HEAD 2>/dev/null || date -u +%Y%m%d-%H%M%S)"
fi
RENDEZVOUS_SERVICE="${RENDEZVOUS_SERVICE:-p2plab-rendezvous}"
WORKER_SERVICE="${WORKER_SERVICE:-p2plab-worker}"
WORKER_REGIONS="${WORKER_REGIONS:-us-central1 us-east1}"
NETWORK="${NETWORK:-p2plab-net}"
SUBNET="${SUBNET:-p2plab-subnet}"
SUBNET_RANGE_PREFIX="${SUBNET_RANGE_PREFIX:-10.8}"
ROUTER="${ROUTER:-p2plab-router}"
NAT="${NAT:-p2plab-nat}"
NAT_UDP_IDLE_TIMEOUT="${NAT_UDP_IDLE_TIMEOUT:-120s}"
NAT_MIN_PORTS_PER_VM="${NAT_MIN_PORTS_PER_VM:-128}"
STUN_SERVERS="${STUN_SERVERS:-stun.l.google.com:19302,stun1.l.google.com:19302}"
INTERNAL_UDP_PORT="${INTERNAL_UDP_PORT:-40000}"
P2P_ROOM="${P2P_ROOM:-default}"
P2P_TOKEN="${P2P_TOKEN:-}"
ADMIN_TOKEN="${ADMIN_TOKEN:-}"
UI_TOKEN="${UI_TOKEN:-}"
P2P_TOKEN_SECRET="${P2P_TOKEN_SECRET:-p2plab-token}"
ADMIN_TOKEN_SECRET="${ADMIN_TOKEN_SECRET:-p2plab-admin-token}"
UI_TOKEN_SECRET="${UI_TOKEN_SECRET:-p2plab-ui-token}"
RUN_SERVICE_ACCOUNT="${RUN_SERVICE_ACCOUNT:-}"
RENDEZVOUS_MAX_WORKERS="${RENDEZVOUS_MAX_WORKERS:-1000}"
if ! [[ "$RENDEZVOUS_MAX_WORKERS" =~ ^[0-9]+$ ]] || ((RENDEZVOUS_MAX_WORKERS < 1 ||
    RENDEZVOUS_MAX_WORKERS > 1000)); then
    echo "RENDEZVOUS_MAX_WORKERS must be 1..1000 (Cloud Run's --concurrency limit)" >&2
    exit 2
fi
# Memory for the connection cap: measured ~42 KiB per registered connection plus ~60 MiB for
# the process (docs/deploy.md, benchmarks/rendezvous_load.py); 48 KiB and 128 MiB leave margin.
# Rounded up to 256 MiB steps, at least Cloud Run gen2's 512 MiB.
RENDEZVOUS_MEMORY_MIB=$(((128 + RENDEZVOUS_MAX_WORKERS * 48 / 1024 + 255) / 256 * 256))
((RENDEZVOUS_MEMORY_MIB < 512)) && RENDEZVOUS_MEMORY_MIB=512
REDIS_URL="${REDIS_URL:-}"
RENDEZVOUS_URL="${RENDEZVOUS_URL:-}"
ALLOW_UNAUTHENTICATED="${ALLOW_UNAUTHENTICATED:-1}"
if [[ -n "$REDIS_URL" ]]; then
    RENDEZVOUS_MAX_INSTANCES="${RENDEZVOUS_MAX_INSTANCES:-3}"
else
    # Without Redis every instance has its own registry: two workers on two instances would
    # never be paired, so there must be exactly one.
    RENDEZVOUS_MAX_INSTANCES="${RENDEZVOUS_MAX_INSTANCES:-1}"
fi

REGISTRY="${REGION}-docker.pkg.dev/${PROJECT_ID}/${AR_REPO}"
RENDEZVOUS_IMAGE="${REGISTRY}/p2plab-rendezvous:${IMAGE_TAG}"
WORKER_IMAGE="${REGISTRY}/p2plab-worker:${IMAGE_TAG}"

read -r -a WORKER_REGION_LIST <<<"$WORKER_REGIONS"
if ((${#WORKER_REGION_LIST[@]} == 0)); then
    echo "WORKER_REGIONS is empty" >&2
    exit 2
fi

# Regions that need a subnet, router and NAT: every worker region, plus the rendezvous region
# when it reaches Redis (Memorystore) through the VPC.
NETWORK_REGIONS=()
add_network_region() {
    local r
    for r in "${NETWORK_REGIONS[@]+"${NETWORK_REGIONS[@]}"}"; do
        [[ "$r" == "$1" ]] && return 0
    done
    NETWORK_REGIONS+=("$1")
}
for r in "${WORKER_REGION_LIST[@]}"; do add_network_region "$r"; done
if [[ -n "$REDIS_URL" ]]; then add_network_region "$REGION"; fi

# Commands are echoed on fd 3 (stdout) so that they stay visible inside $(...) captures.
exec 3>&1

SECRETS=()
[[ -n "$P2P_TOKEN" ]] && SECRETS+=("$P2P_TOKEN")
[[ -n "$ADMIN_TOKEN" ]] && SECRETS+=("$ADMIN_TOKEN")
[[ -n "$UI_TOKEN" ]] && SECRETS+=("$UI_TOKEN")
[[ -n "$REDIS_URL" ]] && SECRETS+=("$REDIS_URL")

print_cmd() {
    local line secret quoted
    line="$(printf '%q ' "$@")"
    line="${line% }"
    for secret in "${SECRETS[@]+"${SECRETS[@]}"}"; do
        quoted="$(printf '%q' "$secret")"
        line="${line//"$secret"/<redacted>}"
        line="${line//"$quoted"/<redacted>}"
    done
    printf '+ %s\n' "$line" >&3
}

note() {
    printf '# %s\n' "$*" >&3
}

run() {
    print_cmd "$@"
    if ((DRY_RUN)); then
        return 0
    fi
    "$@"
}

# exists CMD...: runs a describe command quietly. In a dry run it only prints it and answers
# "missing", so that the create command is printed too.
exists() {
    print_cmd "$@"
    if ((DRY_RUN)); then
        return 1
    fi
    "$@" >/dev/null 2>&1
}

# env_flag K=V...: one --set-env-vars flag. gcloud splits on commas by default, and
# STUN_SERVERS is a comma-separated list, hence the ^|^ delimiter syntax (gcloud topic escaping).
env_flag() {
    local joined="" kv
    for kv in "$@"; do
        if [[ "$kv" == *"|"* ]]; then
            echo "environment value must not contain '|': ${kv%%=*}" >&2
            exit 2
        fi
        joined+="${joined:+|}${kv}"
    done
    printf -- '--set-env-vars=^|^%s' "$joined"
}

# ensure_secret NAME VALUE: the Secret Manager secret NAME, created if missing (with VALUE, or
# a random token when VALUE is empty); a given VALUE becomes its newest version. Values go
# through a private temporary file on stdin, never on a command line.
ensure_secret() {
    local name="$1" value="$2" tmp
    if exists gcloud secrets describe "$name" "${GC[@]}"; then
        [[ -n "$value" ]] || return 0
        tmp="$(mktemp)"
        printf '%s' "$value" >"$tmp"
        run gcloud secrets versions add "$name" --data-file=- "${GC[@]}" <"$tmp"
    else
        [[ -n "$value" ]] || value="$(head -c 32 /dev/urandom | base64 | tr -d '\n=' | tr '+/' '-_')"
        tmp="$(mktemp)"
        printf '%s' "$value" >"$tmp"
        run gcloud secrets create "$name" --replication-policy=automatic --data-file=- \
            "${GC[@]}" <"$tmp"
    fi
    rm -f "$tmp"
    run gcloud secrets add-iam-policy-binding "$name" --member="serviceAccount:${RUN_SA}" \
        --role=roles/secretmanager.secretAccessor --condition=None "${GC[@]}"
}

if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    echo "gcloud not found: install the Google Cloud SDK, or use --dry-run" >&2
    exit 1
fi

GC=(--project="$PROJECT_ID")
AUTH_FLAG=--allow-unauthenticated
((ALLOW_UNAUTHENTICATED)) || AUTH_FLAG=--no-allow-unauthenticated

note "project ${PROJECT_ID}, region ${REGION}, image tag ${IMAGE_TAG}"

note "1. APIs"
run gcloud services enable run.googleapis.com artifactregistry.googleapis.com \
    cloudbuild.googleapis.com compute.googleapis.com secretmanager.googleapis.com "${GC[@]}"

note "1b. secrets: the rendezvous token, the admin token and the worker page token"
if [[ -z "$RUN_SERVICE_ACCOUNT" ]]; then
    describe_project=(gcloud projects describe "$PROJECT_ID" --format=value\(projectNumber\))
    print_cmd "${describe_project[@]}"
    project_number=""
    if ((!DRY_RUN)); then
        project_number="$("${describe_project[@]}" 2>/dev/null || true)"
    fi
    RUN_SERVICE_ACCOUNT="${project_number:-PROJECT_NUMBER}-compute@developer.gserviceaccount.com"
fi
RUN_SA="$RUN_SERVICE_ACCOUNT"
ensure_secret "$P2P_TOKEN_SECRET" "$P2P_TOKEN"
ensure_secret "$ADMIN_TOKEN_SECRET" "$ADMIN_TOKEN"
ensure_secret "$UI_TOKEN_SECRET" "$UI_TOKEN"

note "2. Artifact Registry repository (created if missing)"
if ! exists gcloud artifacts repositories describe "$AR_REPO" --location="$REGION" "${GC[@]}"; then
    run gcloud artifacts repositories create "$AR_REPO" --repository-format=docker \
        --location="$REGION" --description="p2plab images" "${GC[@]}"
fi

if ((SKIP_BUILD)); then
    note "3. build skipped (--skip-build): deploying ${IMAGE_TAG}"
else
    note "3. Cloud Build: both images from deploy/cloudbuild.yaml"
    run gcloud builds submit --config=deploy/cloudbuild.yaml \
        --substitutions="_RENDEZVOUS_IMAGE=${RENDEZVOUS_IMAGE},_WORKER_IMAGE=${WORKER_IMAGE}" \
        "${GC[@]}" .
fi

if ((SKIP_NETWORK)); then
    note "4. network skipped (--skip-network)"
else
    note "4. VPC ${NETWORK}; per region a subnet, a Cloud Router and a Cloud NAT with"
    note "   endpoint-independent mapping (the mapping hole punching relies on)"
    if ! exists gcloud compute networks describe "$NETWORK" "${GC[@]}"; then
        run gcloud compute networks create "$NETWORK" --subnet-mode=custom "${GC[@]}"
    fi
    i=0
    for r in "${NETWORK_REGIONS[@]}"; do
        if ! exists gcloud compute networks subnets describe "$SUBNET" --region="$r" "${GC[@]}"; then
            run gcloud compute networks subnets create "$SUBNET" --network="$NETWORK" \
                --region="$r" --range="${SUBNET_RANGE_PREFIX}.${i}.0/24" "${GC[@]}"
        fi
        if ! exists gcloud compute routers describe "$ROUTER" --region="$r" "${GC[@]}"; then
            run gcloud compute routers create "$ROUTER" --network="$NETWORK" --region="$r" \
                "${GC[@]}"
        fi
        nat_flags=(
            --router="$ROUTER"
            --region="$r"
            --auto-allocate-nat-external-ips
            --nat-custom-subnet-ip-ranges="$SUBNET"
            --enable-endpoint-independent-mapping
            --no-enable-dynamic-port-allocation
            --min-ports-per-vm="$NAT_MIN_PORTS_PER_VM"
            --udp-idle-timeout="$NAT_UDP_IDLE_TIMEOUT"
            "${GC[@]}"
        )
        if exists gcloud compute routers nats describe "$NAT" --router="$ROUTER" --region="$r" \
            "${GC[@]}"; then
            run gcloud compute routers nats update "$NAT" "${nat_flags[@]}"
        else
            run gcloud compute routers nats create "$NAT" "${nat_flags[@]}"
            if ((DRY_RUN)); then
                note "   (when ${NAT} exists: gcloud compute routers nats update with the same flags)"
            fi
        fi
        i=$((i + 1))
    done
fi

note "5. rendezvous service (tokens from Secret Manager; ${RENDEZVOUS_MAX_WORKERS} connections"
note "   per instance in ${RENDEZVOUS_MEMORY_MIB} MiB)"
# TRUST_PROXY_HEADERS: behind Cloud Run's front end the socket's peer is the front end, so the
# per-IP limits count the client address it appends to X-Forwarded-For.
rendezvous_env=("MAX_WORKERS=${RENDEZVOUS_MAX_WORKERS}" "TRUST_PROXY_HEADERS=1")
[[ -n "$REDIS_URL" ]] && rendezvous_env+=("REDIS_URL=${REDIS_URL}")
rendezvous_flags=(
    --image="$RENDEZVOUS_IMAGE"
    --region="$REGION"
    --platform=managed
    "$AUTH_FLAG"
    --port=8080
    --execution-environment=gen2
    --session-affinity
    --timeout=3600
    --min-instances=1
    --max-instances="$RENDEZVOUS_MAX_INSTANCES"
    --no-cpu-throttling
    --concurrency="$RENDEZVOUS_MAX_WORKERS"
    --cpu=1
    --memory="${RENDEZVOUS_MEMORY_MIB}Mi"
    "--set-secrets=P2P_TOKEN=${P2P_TOKEN_SECRET}:latest,ADMIN_TOKEN=${ADMIN_TOKEN_SECRET}:latest"
    "$(env_flag "${rendezvous_env[@]}")"
)
if [[ -n "$REDIS_URL" ]]; then
    # Only private ranges (Memorystore) go through the VPC; the workers' WebSockets come in
    # through Cloud Run's front end as usual.
    rendezvous_flags+=(--network="$NETWORK" --subnet="$SUBNET" --vpc-egress=private-ranges-only)
fi
run gcloud run deploy "$RENDEZVOUS_SERVICE" "${rendezvous_flags[@]}" "${GC[@]}"

if [[ -z "$RENDEZVOUS_URL" ]]; then
    describe_url=(gcloud run services describe "$RENDEZVOUS_SERVICE" --region="$REGION"
        --format=value\(status.url\) "${GC[@]}")
    print_cmd "${describe_url[@]}"
    if ((DRY_RUN)); then
        https_url="https://${RENDEZVOUS_SERVICE}-DRYRUN.${REGION}.run.app"
    else
        https_url="$("${describe_url[@]}")"
    fi
    if [[ "$https_url" != https://* ]]; then
        echo "unexpected rendezvous URL: '${https_url}'" >&2
        exit 1
    fi
    RENDEZVOUS_URL="wss://${https_url#https://}"
fi
note "rendezvous for the workers: ${RENDEZVOUS_URL}"

note "6. worker services, one peer each"
i=1
for r in "${WORKER_REGION_LIST[@]}"; do
    worker_env=(
        "RENDEZVOUS_URL=${RENDEZVOUS_URL}"
        "STUN_SERVERS=${STUN_SERVERS}"
        "INTERNAL_UDP_PORT=${INTERNAL_UDP_PORT}"
        "P2P_ROOM=${P2P_ROOM}"
    )
    run gcloud run deploy "${WORKER_SERVICE}-${i}" \
        --image="$WORKER_IMAGE" \
        --region="$r" \
        --platform=managed \
        "$AUTH_FLAG" \
        --port=8080 \
        --execution-environment=gen2 \
        --network="$NETWORK" \
        --subnet="$SUBNET" \
        --vpc-egress=all-traffic \
        --no-cpu-throttling \
        --min-instances=1 \
        --max-instances=1 \
        --timeout=3600 \
        --session-affinity \
        --cpu=1 \
        --memory=512Mi \
        "--set-secrets=P2P_TOKEN=${P2P_TOKEN_SECRET}:latest,UI_TOKEN=${UI_TOKEN_SECRET}:latest" \
        "$(env_flag "${worker_env[@]}")" \
        "${GC[@]}"
    i=$((i + 1))
done

note "7. each worker page accepts its Cloud Run host name (UI_ALLOWED_HOSTS); where to go"
i=1
for r in "${WORKER_REGION_LIST[@]}"; do
    describe_worker=(gcloud run services describe "${WORKER_SERVICE}-${i}" --region="$r"
        --format=value\(status.url\) "${GC[@]}")
    print_cmd "${describe_worker[@]}"
    if ((DRY_RUN)); then
        worker_url="https://${WORKER_SERVICE}-${i}-DRYRUN.${r}.run.app"
    else
        worker_url="$("${describe_worker[@]}")"
    fi
    worker_host="${worker_url#https://}"
    run gcloud run services update "${WORKER_SERVICE}-${i}" --region="$r" \
        "--update-env-vars=UI_ALLOWED_HOSTS=${worker_host%%/*}" "${GC[@]}"
    note "worker ${i}: ${worker_url}/?token=<page token>"
    i=$((i + 1))
done
note "open each worker URL in a browser with ?token=<its page token>; the page token is"
note "  gcloud secrets versions access latest --secret=${UI_TOKEN_SECRET} --project=${PROJECT_ID}"
note "the two workers pair through ${RENDEZVOUS_URL}"
