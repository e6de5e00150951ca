"""HTTP only: wire schemas, request decoding, routes, error mapping and middleware."""
