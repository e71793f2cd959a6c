"""A backend whose contexts are Polars Cloud compute contexts (proxy mode).

::

    backend.py  the Backend: contexts (start, status, stop, list) and the ledger's use
    manifests.py starts through manifests (an idempotent start by name) and their computes
    queries.py  queries: forwarded in proxy mode, followed, cancelled, results fetched
    calls.py    how a call is made: token, thread, timeout, retries
    host.py     the polars-cloud client in a process of its own
    client.py   every use of the client's undocumented layer (runs in that process)
    ledger.py   what this deployment started: entries and the rules that match them

Talks to Polars Cloud through the pinned ``polars-cloud`` client; every call into its
undocumented layer is in ``client.py`` (read its docstring for why and for the client
behaviour this relies on). The client is configured through environment variables, so it
runs in a child process of its own (``host.py``) whose environment is made for it: the
service never edits its own ``os.environ``. Blocking calls run on a small thread pool of
the backend's own (so calls abandoned at their timeout never crowd out the event loop's
default executor), each bounded by ``polars_cloud.request_timeout_s``.

**Auth.** The service, not the client, holds the service account: a
:class:`~pclease_service.credentials.TokenProvider` does the OAuth2 exchange and each call
carries only the short-lived access token, which the client's process puts in its own
``POLARS_CLOUD_ACCESS_TOKEN``. Before each call the backend asks the provider for a token
(refreshed before it expires); when Polars Cloud answers 401 it invalidates that token
(the provider re-reads the source, so a rotated secret takes effect) and retries the call
once. The client secret never reaches the client: its process's environment has no
``POLARS_CLOUD_CLIENT_ID``, ``POLARS_CLOUD_CLIENT_SECRET`` or access token of the service's
(nor the env source's variables), because the client, handed no token, would do its own
client-credentials exchange with them.

**Handles** are ``{"workspace_id": str, "compute_id": str}``.

**Manifests.** With ``polars_cloud.use_manifests`` (the default) a context is started
through a manifest named for its profile and slot, which Polars Cloud starts at most once
at a time: a repeated, lost or timed-out start reconnects to the cluster it made, and the
computes carry the manifest's name, whose registration names the context. ``manifests.py``
has the rules (slots, re-registration, which named computes are ours). What follows about
the ledger applies to starts with ``use_manifests`` off and to computes started without a
manifest.

**Which contexts are ours.** Contexts are started with the deployment's labels
(``pclease.managed-by=pclease``, ``pclease.instance``, ``pclease.context-id``,
``pclease.profile`` as ``key=value`` strings) so they can be told apart in Polars Cloud's
own UI, but polars-cloud 0.12.0's compute model does not return labels, so :meth:`list`
cannot read them back. Instead the backend keeps a start ledger (one entry per context,
no secrets) in the service database, through the
:class:`~pclease_service.backends.base.StartLedger` the service hands it, so every replica
sees every start: an entry is written *before* the start request (compute id still
unknown, with the fence of the claim it is made under and the time until which its
request may still answer) and completed when the start returns. :meth:`list` reports

- live computes whose id is in the ledger, with their context id;
- a live compute that the service account started and no entry knows, if exactly one
  pending entry of the same workspace could have asked for it and it is the only such
  compute for that entry (same cpus, memory and cluster size, requested after the entry);
  the entry is completed, so the reconciler adopts or stops it. Nothing is matched in a
  workspace while a start of this process is still waiting for its answer there, and no
  entry is matched while its own request (another replica's) may still answer: until its
  maker has recorded its compute, that compute cannot be told from the one a lost answer
  made.
  A start that fails before sending its request (credentials) forgets its entry, so a
  stale entry never claims a compute that someone else started;
- with ``polars_cloud.stop_unknown_computes`` on, any other live compute the service
  account started that no pending entry (of any replica) could have made, without a
  context id, so the reconciler stops it. That setting is for
  a service account this deployment has to itself: computes the account starts elsewhere
  would count as orphans. Off (the default), they are left alone and Polars Cloud's own
  ``idle_timeout_mins`` is the backstop for a lost ledger.

**A start of a context that already has an entry** (its maker died or was deposed before
the handle was saved, and another replica took the context over): an entry with a newer
fence than the start's refuses it; a completed entry's compute is returned; a pending one
is waited for until its request can no longer answer, then the workspace is listed and the
one compute it could have made is returned (and recorded) instead of starting a second.
Only if it made none is a new start sent.

Entries of releases that kept the ledger as files (``data_dir/polars_cloud/ledger/``) are
moved into the database the first time the backend lists or starts.

**Failures.** Status, list and stop are retried on errors (they are safe to repeat); a
stop whose compute has vanished succeeds, and one workspace that cannot be listed does not
keep :meth:`list` from reporting the others. A start is retried only after listing shows
that the failed attempt did not create a compute; a start that timed out is not retried
(its request may still land), and its pending ledger entry lets the next sweep find what it
created. ``backend_call_timeout_s`` is checked at startup to cover the slowest start.

**Queries**: see ``queries.py``.

Exceptions::

    BackendError    a call failed after its retries, the credentials do not work, or a
                    handle is unusable (a query that fails is an outcome, not an exception)
"""

from pclease_service.backends.polars_cloud.backend import PolarsCloudBackend

__all__ = ["PolarsCloudBackend"]
