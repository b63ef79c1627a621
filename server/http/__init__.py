"""The OpenAI-compatible HTTP door (`--http-port`): `openai` is the app, `schema` the request
bodies, `door` runs it under uvicorn on the gRPC server's event loop."""
