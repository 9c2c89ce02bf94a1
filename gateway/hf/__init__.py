"""The Hugging Face side: resolve paths, upstream's catalog of revisions, relaying to upstream,
and redirect URLs built from validated paths."""
