"""The node side: mirror repositories from upstream, publish manifests, verify the copy."""
