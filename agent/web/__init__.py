"""`voice-agent serve`: the agent in a browser page (server.py; the page is static/, shipped as package data)."""
