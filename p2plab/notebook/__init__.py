"""p2plab subpackage."""
