"""lorafleet server: one frozen base model, many tenants' adapters, one batch."""
