from p2plab.cli import main

raise SystemExit(main())
