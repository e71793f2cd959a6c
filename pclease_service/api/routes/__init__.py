"""The v1 routes, one module per resource; thin: validate, call the domain, shape."""
