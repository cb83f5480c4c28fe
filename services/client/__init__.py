"""``fuseserve.client``: a small Python client of the aligner, REST and gRPC, sync and async.

Every transport answers with the same ``FuseReply`` (``fuseserve.wire.fuse_reply``): per text a
``ReplyBlock`` whose ``block`` is a ``FusedBlock`` of the requested rows, target_ids [n] int32,
ids [n, width] int32 (-1 pad), probs [n, width] float32 (most probable first), tail [n],
chosen [n], plus the block's ce [K] and coverage [K]. ``FuseParams`` holds the fusion choices and
the cut (top-n per row, position range); errors are ``FuseError``.

    from fuseserve.client import FuseParams, RestClient
    with RestClient("http://localhost:8080") as client:
        reply = client.fuse("def add(a, b):\\n    return a + b\\n", FuseParams(top=5))

Leaves out: the server side; retry policies (errors say whether and when to retry).
"""

from fuseserve.client.grpc_client import AsyncGrpcClient, GrpcClient
from fuseserve.client.params import FuseError, FuseParams
from fuseserve.client.rest import AsyncRestClient, RestClient
from fuseserve.wire.fuse_reply import MEDIA_TYPE, FuseReply, ReplyBlock
from fuseserve.wire.status import RETRYABLE, retryable

__all__ = [
    "MEDIA_TYPE",
    "RETRYABLE",
    "AsyncGrpcClient",
    "AsyncRestClient",
    "FuseError",
    "FuseParams",
    "FuseReply",
    "GrpcClient",
    "ReplyBlock",
    "RestClient",
    "retryable",
]
