"""The luaq Kubernetes operator (renders QueueConsumer resources into worker Deployments)."""
