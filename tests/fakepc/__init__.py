"""A fake Polars Cloud control plane that the unmodified ``polars-cloud==0.12.0`` client accepts.

Use::

    fake = FakePolarsCloud(client_id="pc-client-id", client_secret="s", workspace="pclease-ws",
                           data_dir=tmp_path, token_ttl_s=3600).start()   # or `with ...:`
    env = fake.client_env(config_dir=tmp_path / "pc")  # API addr, a fresh token, config dir
    ...
    fake.close()

``fake.url`` is the value for ``POLARS_CLOUD_API_ADDR`` and ``fake.token_url`` the OAuth2
client-credentials endpoint (form body or HTTP Basic client auth; 401 ``invalid_client``
otherwise). Every other REST call and every gRPC call needs ``authorization: Bearer <token>``
with a token this fake issued, unexpired and not revoked (REST 401 ``{"message", "errors"}``,
gRPC UNAUTHENTICATED). ``fake.issue_token()`` mints one without HTTP.

Knobs (plain attributes, settable from any thread at any time; ``KNOBS`` has their
defaults): ``start_delay_s``, ``stop_delay_s``, ``fail_starts`` (answer 500, create
nothing), ``lose_start_answers`` (create the compute, then answer 500),
``hang_start_answers_s`` (create the compute, then hold the answer back this long),
``start_ends_failed``, ``fail_stops``, ``query_error``, ``query_delay_s``,
``hang_submit_answers_s`` (take the query, then hold the gRPC answer back); methods
``reset(**knobs)`` (every knob to its default, no error burst, the original credentials,
no running compute), ``error_burst(n, status)``, ``rotate(client_secret, client_id)``,
``revoke_tokens()``, ``fail_compute(compute_id, message)``. Inspection (snapshots):
``computes()``, ``running()``, ``queries()``, ``manifests.snapshot()``, ``calls``
(:class:`Call`), ``tokens_issued``, ``workspace_id``, ``organization_id``.

Layout: ``control`` holds the state and JSON shapes, ``rest`` the HTTP/1.1 routes,
``manifests`` the named compute contexts (state, shapes and routes; its docstring has what
the client sends), ``grpc_api`` the gRPC ClientService on raw bytes (``protowire``
hand-codes the few messages), ``front`` splices each connection on the public port to one
or the other by its first bytes (``PRI `` = HTTP/2), ``plans`` runs submitted plans with
Polars, ``tokens`` the OAuth side.

Wire facts verified by driving the real client (beyond the shared reference):

- The client reads ``POLARS_CLOUD_API_ADDR`` once, when ``polars_cloud`` is imported;
  setting it later, or building a new ``ApiClient``, still talks to the production address.
  ``POLARS_CLOUD_ACCESS_TOKEN`` is re-read on every call. So a process can only ever talk to
  one fake: run the client in a subprocess per fake (``tests/backends/test_fakepc.py`` does).
- ``ComputeContext`` defaults to ``connection_mode="direct"``, which needs
  ``.../compute/{C}/public_info`` and a TLS compute plane this fake does not provide: pass
  ``connection_mode="proxy"``.
- Start body: ``{"specs": {"cpus", "ram_gb", "cpu_architectures": ["X86_64"], "multiplier"},
  "storage", "big_instance_storage", "cluster_size", "mode": "Proxy", "python_version":
  {"major", "minor", "patch"}, "polars_version": "2.0.0", "labels": ["a=b", ...],
  "log_level": "Info", "idle_timeout_mins", "requirements_txt", "env_vars": {}}``.
- Labels go out as a plain list of strings and never come back as names. The client's Rust
  compute model parses ``label_ids`` (a list of UUIDs: a non-UUID there breaks decoding), but
  the Python ``ComputeModel`` exposes no labels at all and ``ComputeContext.list()`` sets
  ``labels=None``. So a backend cannot recognise its contexts from ``list`` by label: it must
  remember the compute ids it started, or start them from manifests (``name`` on the model
  is the manifest's name, null for computes started without one). The fake answers
  ``label_ids`` as a stable uuid5 per label name (``fake.label_id(name)``), keeps the list
  (``computes()[i]["label_list"]``) and a dict of ``key=value``/``key:value`` pairs
  (``["labels"]``; a bare label maps to ``""``).
- ``compute_plane_version`` must be semver or null.
- SubmitQuery field 4 (query labels, from ``lf.remote(ctx).labels([...])``) is
  ``{1: repeated {1: label}}``, an empty message without labels; ``queries()[i]["labels"]``.
- SubmitQuery field 2 (query settings) carries the engine, single-node or distributed
  with the shuffle options, planner switches and worker bounds of
  ``lf.remote(ctx).distributed(...)``; :func:`tests.fakepc.grpc_api.query_settings` reads
  it (field numbers and enum values there) and ``queries()[i]["settings"]`` has it, e.g.
  ``{"mode": "distributed", "engine": "auto", "min_workers": 2, "shuffle_format": "ipc",
  ...}``. The fake records the settings and runs every plan on one node, for real.
- ``.remote(ctx).sink_parquet(path)`` returns a ``ProxyQuery`` without waiting; call
  ``.await_result()``. ``.collect()`` is refused client-side for proxy contexts; use
  ``.execute()`` (sinks to ``<in-memory>``) then ``.lazy()``.
- The result Destination uri of an ``<in-memory>`` sink is the absolute local path of a
  parquet file under ``data_dir/results/`` (no ``file://`` scheme): the client
  ``pl.scan_parquet``\\ s it directly. Other sinks run against their own path and report it.

Behaviour and limits: computes go Starting -> Running after ``start_delay_s`` (or -> Failed
with ``start_ends_failed``), stop gives Stopping -> Stopped after ``stop_delay_s`` with
``termination.termination_reason = "StoppedByUser"``. No idle timeout, no Idle status, no
direct mode; manifests keep one cluster each (see ``manifests``). Queries are accepted only
on Running computes (else gRPC FAILED_PRECONDITION), run for real in a worker thread, and
report one stage.
Errors are ``{"scheduler": "Class: msg"}``. ``error_burst`` hits REST only, not gRPC.
Cancel marks a query Canceled at once and a query still waiting out ``query_delay_s`` never
runs; but polars 2.0's ``InProcessQuery.cancel()`` does not interrupt a running sink
(measured), so a query already executing finishes in the background (a sink to a path the
caller chose is still written) and its result is discarded. ``close()`` waits for it.
"""

from tests.fakepc.control import Call
from tests.fakepc.server import FakePolarsCloud

__all__ = ["Call", "FakePolarsCloud"]
