"""The ceiling for the HTTP benchmarks: a minimal async FastAPI endpoint returning a small
pydantic model, served by uvicorn with the options ``pclease serve`` uses.

    .venv/bin/python bench/ceiling.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from pclease_service.serving import UVICORN_OPTIONS


class Pong(BaseModel):
    id: str
    state: str
    refcount: int


app = FastAPI()


@app.get("/ceiling")
async def ceiling() -> Pong:
    return Pong(id="00000000-0000-0000-0000-000000000000", state="active", refcount=1)


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", **UVICORN_OPTIONS
    )
