"""MLflow: tracking setup, artifact logging, model packaging, the registry."""
