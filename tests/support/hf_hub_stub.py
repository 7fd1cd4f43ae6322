"""A Hugging Face Hub on loopback, for `pull-model` and first-use downloads:
the few endpoints `huggingface_hub.snapshot_download` calls (repo info, tree
listing, `resolve` with HEAD and GET), serving the files of local folders as
repos. It checks the bearer token when one is set, and records requests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

from tests.support.server import Received, ThreadedServer

SHA = "0123456789abcdef0123456789abcdef01234567"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStub(ThreadedServer):
    name = "hf-hub"

    def __init__(self, repos: dict[str, Path], token: str | None = None) -> None:
        super().__init__()
        self.repos = repos
        self.token = token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self.tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)

    def _repo(self, request: web.Request) -> Path:
        self.requests.append(Received(request.path, dict(request.query), request.headers.copy(), b"",
                                      request.transport.get_extra_info("peername") if request.transport else ("", 0)))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(text='{"error":"Invalid credentials"}', content_type="application/json")
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            raise web.HTTPNotFound(text='{"error":"Repository not found"}', content_type="application/json",
                                   headers={"X-Error-Code": "RepoNotFound"})
        return self.repos[repo]

    def _files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file())

    async def info(self, request: web.Request) -> web.Response:
        folder = self._repo(request)
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        return web.json_response({"id": repo, "modelId": repo, "sha": SHA, "private": False,
                                  "siblings": [{"rfilename": str(p.relative_to(folder))}
                                               for p in self._files(folder)]})

    async def tree(self, request: web.Request) -> web.Response:
        folder = self._repo(request)
        entries = []
        for p in self._files(folder):
            data = p.read_bytes()
            entries.append({"type": "file", "path": str(p.relative_to(folder)), "size": len(data),
                            "oid": git_blob_id(data)})
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        folder = self._repo(request)
        path = folder / request.match_info["path"]
        if not path.is_file():
            raise web.HTTPNotFound(text='{"error":"Entry not found"}', content_type="application/json",
                                   headers={"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        headers = {"X-Repo-Commit": SHA, "ETag": f'"{git_blob_id(data)}"', "Content-Length": str(len(data)),
                   "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        return web.Response(body=data, headers=headers)
