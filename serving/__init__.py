"""Ray Serve deployments of raydar: the ensembled detection endpoint (`serving.app:build_app`)."""
