"""autoglm.node: the running node (IO lives here)."""
