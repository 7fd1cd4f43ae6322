"""HTTP endpoints, one module per area; `router.app` mounts them."""
