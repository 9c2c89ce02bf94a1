"""mirror-gateway: geo-aware mirror routing for Hugging Face-style downloads."""
