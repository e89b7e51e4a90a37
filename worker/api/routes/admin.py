"""Admin-only: accounts of the service and the model registry."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from db import models as m
from worker.api import auth
from worker.api.deps import Admin, tx

router = APIRouter(prefix="/api/v1", tags=["admin"])


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    role: Literal["reviewer", "admin"]
    password: str | None = Field(None, min_length=8, max_length=1024)


class NewToken(BaseModel):
    label: str | None = Field(None, max_length=255)


def _user(user: m.ApiUser) -> dict[str, Any]:
    return {"name": user.name, "role": user.role, "active": user.active,
            "has_password": user.password_hash is not None,
            "created_at": user.created_at.isoformat() if user.created_at else None}


@router.get("/users", summary="Accounts of the service")
def list_users(request: Request, who: Admin) -> list[dict[str, Any]]:
    with tx(request) as session:
        return [_user(u) for u in session.execute(select(m.ApiUser).order_by(m.ApiUser.name)).scalars()]


@router.post("/users", status_code=201, summary="Create an account (reviewer or admin)")
def create_user(request: Request, who: Admin, body: NewUser) -> dict[str, Any]:
    try:
        with tx(request) as session:
            return _user(auth.create_user(session, body.name, body.role, body.password))
    except auth.AuthError as exc:
        raise HTTPException(409 if "exists" in str(exc) else 422, str(exc)) from None


@router.post("/users/{name}/tokens", status_code=201, summary="Issue a bearer token (shown only in this answer)")
def create_token(request: Request, who: Admin, name: str, body: NewToken | None = None) -> dict[str, str]:
    try:
        with tx(request) as session:
            token = auth.issue_token(session, name, body.label if body else None)
    except auth.AuthError as exc:
        raise HTTPException(404, str(exc)) from None
    return {"user": name, "token": token}


@router.post("/users/{name}/deactivate", summary="Lock an account out and revoke its tokens")
def deactivate(request: Request, who: Admin, name: str) -> dict[str, Any]:
    try:
        with tx(request) as session:
            auth.deactivate_user(session, name)
            return _user(auth.user_by_name(session, name))
    except auth.AuthError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/models", summary="The model registry: versions, status, metrics")
def list_models(request: Request, who: Admin) -> list[dict[str, Any]]:
    with tx(request) as session:
        rows = session.execute(select(m.ModelVersion).order_by(m.ModelVersion.name, m.ModelVersion.id)).scalars()
        return [{"id": r.id, "name": r.name, "version": r.version, "status": r.status, "metrics": r.metrics,
                 "checksum": r.checksum, "created_at": r.created_at.isoformat() if r.created_at else None,
                 "promoted_at": r.promoted_at.isoformat() if r.promoted_at else None,
                 "retired_at": r.retired_at.isoformat() if r.retired_at else None} for r in rows]
