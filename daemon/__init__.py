"""provisiond: keeps SCIM 2.0 services in step with a PingOne directory."""
