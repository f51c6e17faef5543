class KVConnectorMetadata:
    """vLLM's base of connector metadata: an empty marker class."""
