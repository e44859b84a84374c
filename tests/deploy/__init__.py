"""Deployment tests: Dockerfile, docker-compose.yml and the Kubernetes manifests, checked offline."""
