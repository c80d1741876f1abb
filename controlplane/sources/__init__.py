"""Where resources come from: a folder of YAML files (and, later, the Kubernetes API)."""
