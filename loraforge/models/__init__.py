"""Finding and reading a pretrained model: where it is (Hub or disk), its safetensors checkpoint,
which modules an adapter targets, and their weights."""
