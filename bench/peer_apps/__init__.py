"""The peers' apps, run by bench/peer_frameworks.py under .venv-peers; common.py is their shared part."""
