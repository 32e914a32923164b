"""HTTP resources: thin adapters between Falcon and the service calls."""
