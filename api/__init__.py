"""The HTTP API for other services (DESIGN §8): FastAPI on uvicorn, `inpaint-api`. Imports api_client, never
torch or worker."""
