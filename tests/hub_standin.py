"""A local stand-in for the parts of the Hugging Face Hub HTTP API that publishing uses.

Point HF_ENDPOINT at `HubStandIn().start()` and the real `huggingface_hub` client runs its real code path
against it: create_repo, create_branch, create_tag / delete_tag / list_repo_refs (tags name commits; a revision
may be a tag), repo_info, validate-yaml (README metadata), preupload (every
file is answered "regular", i.e. inline base64, no LFS), commit (NDJSON, with parentCommit checks),
list_repo_tree, and file downloads (HEAD/GET resolve, what snapshot_download uses). Repos live in memory as commits of {path: bytes}; every request's headers are recorded
so tests can check that the token was sent (and nowhere else). `fail()` makes chosen requests fail the way
networks do: the connection dropped half-way through the upload, the answer lost after the commit landed,
or an HTTP error status.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = None
        self.faults: list[dict] = []
        self.faults_hit = 0

    # ---- lifecycle ----
    def start(self) -> str:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                standin._handle(self, "GET")

            def do_POST(self):
                standin._handle(self, "POST")

            def do_HEAD(self):
                standin._handle(self, "HEAD")

            def do_DELETE(self):
                standin._handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    # ---- faults ----
    def fail(self, action: str, revision: str, how: str | int = "drop_request", times: int = 1, method: str = "POST") -> None:
        """Make the next `times` requests of `action` (commit, branch, revision, resolve ...) to a revision
        starting with `revision` fail.

        how="drop_request": half the upload is read, then the connection is closed (nothing is applied);
        "drop_response": the request is applied, then the connection is closed before the answer;
        an int: that HTTP status is answered (nothing is applied).
        """
        self.faults.append({"action": action, "revision": revision, "how": how, "left": times, "method": method})

    def _fault_for(self, method: str, path: str) -> dict | None:
        match = re.fullmatch(r"(?:/api/models)?/[^/]+/[^/]+/([^/]+)/([^/]+)(/.*)?", path)
        if not match:
            return None
        for fault in self.faults:
            if fault["left"] and fault["method"] == method and fault["action"] == match.group(1) \
                    and unquote(match.group(2)).startswith(fault["revision"]):
                fault["left"] -= 1
                self.faults_hit += 1
                return fault
        return None

    def commits_on(self, repo_id: str, revision: str) -> list[str]:
        """Commit ids from `revision`'s head back to the first commit."""
        repo = self.repos[repo_id]
        oid, chain = repo["branches"].get(revision, revision), []
        while oid:
            chain.append(oid)
            oid = repo["commits"][oid]["parent"]
        return chain

    # ---- state helpers for tests ----
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo["commits"][self._resolve(repo, revision)]["files"])

    def tags(self, repo_id: str) -> dict[str, str]:
        """Tag name -> commit id."""
        return dict(self.repos[repo_id]["tags"])

    @staticmethod
    def _resolve(repo: dict, revision: str) -> str | None:
        """The commit a branch, tag or commit id names (None: none)."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["tags"]:
            return repo["tags"][revision]
        return revision if revision in repo["commits"] else None

    def _new_commit(self, repo: dict, files: dict, parent: str | None, summary: str) -> str:
        oid = hashlib.sha1(json.dumps([parent, summary, sorted((p, git_blob_sha1(c)) for p, c in files.items())]).encode()).hexdigest()
        repo["commits"][oid] = {"files": files, "parent": parent, "summary": summary}
        return oid

    # ---- routing ----
    def _handle(self, handler: BaseHTTPRequestHandler, method: str):
        url = urlparse(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        with self.lock:
            fault = self._fault_for(method, url.path)
        if fault and fault["how"] == "drop_request":
            handler.rfile.read(length // 2)
            handler.close_connection = True  # no answer: the client sees the connection drop mid-upload
            return
        body = handler.rfile.read(length) if length else b""
        download = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
        if download and method in ("GET", "HEAD") and not (fault and isinstance(fault["how"], int)):
            return self._download(handler, method, download.group(1), unquote(download.group(2)), unquote(download.group(3)))
        with self.lock:
            self.requests.append({"method": method, "path": url.path, "headers": {k.lower(): v for k, v in handler.headers.items()}})
            try:
                if fault and isinstance(fault["how"], int):
                    status, payload = fault["how"], {"error": f"stand-in fault: HTTP {fault['how']}"}
                else:
                    status, payload = self._route(method, url.path, parse_qs(url.query), body, handler.headers)
            except KeyError as missing:
                status, payload = 404, {"error": f"not found: {missing}"}
        if fault and fault["how"] == "drop_response":
            handler.close_connection = True  # applied, but the answer is lost
            return
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if status >= 400:
            handler.send_header("X-Error-Message", payload.get("error", ""))
        handler.end_headers()
        handler.wfile.write(data)

    def _download(self, handler, method: str, repo_id: str, revision: str, file_path: str):
        with self.lock:
            self.requests.append({"method": method, "path": handler.path, "headers": {k.lower(): v for k, v in handler.headers.items()}})
            repo = self.repos.get(repo_id)
            head = repo and self._resolve(repo, revision)
            content = repo["commits"][head]["files"].get(file_path) if head else None
        if content is None:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", head)
        handler.send_header("ETag", f'"{git_blob_sha1(content)}"')
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if method == "GET":
            handler.wfile.write(content)

    def _route(self, method, path, query, body, headers):
        if not headers.get("Authorization", "").startswith("Bearer "):
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            repo = {"private": request.get("visibility") == "private", "branches": {}, "tags": {}, "commits": {}}
            repo["branches"]["main"] = self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n"}, None, "initial commit")
            self.repos[repo_id] = repo
            return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        refs = re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path)
        if refs and method == "GET":
            repo = self.repos.get(refs.group(1))
            if repo is None:
                return 404, {"error": "Repository not found"}
            def listed(kind, names):
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(names.items())]
            return 200, {"branches": listed("heads", repo["branches"]), "tags": listed("tags", repo["tags"]),
                         "converts": [], "pullRequests": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|tag|revision|preupload|commit|tree)/([^/]+)(/.*)?", path)
        if not match:
            return 404, {"error": f"no such endpoint: {method} {path}"}
        repo_id, action, revision, rest = match.group(1), match.group(2), unquote(match.group(3)), match.group(4)
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        if action == "branch" and method == "POST":
            if revision in repo["branches"]:
                return 409, {"error": "Branch already exists"}
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo["branches"][revision] = repo["branches"].get(start, start)
            return 200, {}
        if action == "tag" and method == "DELETE":  # the revision part is the tag's name
            if repo["tags"].pop(revision, None) is None:
                return 404, {"error": f"Tag {revision} not found"}
            return 200, {}
        head = self._resolve(repo, revision)
        if action == "tag" and method == "POST" and head is not None:
            tag = json.loads(body)["tag"]
            if tag in repo["tags"] or tag in repo["branches"]:
                return 409, {"error": f"Tag {tag} already exists"}
            repo["tags"][tag] = head
            return 200, {}
        if head is None:
            return 404, {"error": f"Invalid rev id: {revision}"}
        if action == "revision":
            files = repo["commits"][head]["files"]
            return 200, {"id": repo_id, "modelId": repo_id, "sha": head, "private": repo["private"],
                         "siblings": [{"rfilename": p} for p in sorted(files)]}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if action == "commit":
            return self._commit(repo, repo_id, revision, head, body)
        if action == "tree":
            prefix = unquote(rest.lstrip("/")) if rest else ""
            files = repo["commits"][head]["files"]
            entries, folders = [], set()
            for file_path in sorted(files):
                if prefix and not file_path.startswith(prefix.rstrip("/") + "/"):
                    continue
                parts = file_path.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                entries.append({"type": "file", "oid": git_blob_sha1(files[file_path]), "size": len(files[file_path]), "path": file_path})
            entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f} for f in sorted(folders)]
            return 200, entries
        return 404, {"error": f"no such endpoint: {method} {path}"}

    def _commit(self, repo, repo_id, revision, head, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if header.get("parentCommit") and header["parentCommit"] != head:
            return 412, {"error": f"A commit has happened since. Please refresh and try again. (head is {head})"}
        if revision not in repo["branches"]:
            return 400, {"error": f"Cannot commit to {revision}: not a branch"}
        files = dict(repo["commits"][head]["files"])
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"])
            elif line["key"] == "deletedFolder":
                for file_path in [p for p in files if p.startswith(line["value"]["path"].rstrip("/") + "/")]:
                    files.pop(file_path)
            elif line["key"] != "header":
                return 400, {"error": f"stand-in does not implement {line['key']} (LFS) uploads"}
        oid = self._new_commit(repo, files, head, header["summary"])
        repo["branches"][revision] = oid
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
