"""The Polars Cloud service account: where it is read from, and the access tokens it buys.

The service is the only holder of the service account's secret. Pick a source with
``polars_cloud.credentials`` (:func:`create_source`) and hand it to a
:class:`TokenProvider`; everything else only ever sees short-lived access tokens.

::

    base.py       ServiceAccount, CredentialsError, the CredentialSource interface
    env.py        environment variables
    file.py       mounted secret files
    aws.py        AWS Secrets Manager
    registry.py   CredentialSourceKind -> source class (create_source)
    tokens.py     TokenProvider, CredentialStatus, install_sighup
"""

from pclease_service.credentials.base import CredentialsError, CredentialSource, ServiceAccount
from pclease_service.credentials.registry import SOURCES, create_source
from pclease_service.credentials.tokens import CredentialStatus, TokenProvider, install_sighup

__all__ = [
    "SOURCES",
    "CredentialSource",
    "CredentialStatus",
    "CredentialsError",
    "ServiceAccount",
    "TokenProvider",
    "create_source",
    "install_sighup",
]
