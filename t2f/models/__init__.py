"""Models: frozen text encoder, CA head, mapping and synthesis networks, recaptioner, checkpoint loading."""
