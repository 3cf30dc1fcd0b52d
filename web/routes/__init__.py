"""HTTP routes, one module per resource. Each view parses input, calls the runtime, shapes output."""
