"""Prefect flows, deployments and artifacts over the stage engine (thin: no stage logic here)."""
