"""qwen2-client: the Python SDK and CLI for a qwen2-cluster gRPC server (grpcio + protobuf; no torch, no ray).

    from qwen2_client import Client
    with Client("localhost:50051") as c:
        print(c.generate("The capital of France is", max_new_tokens=8, temperature=0).text)
"""

from .aio import AsyncClient, AsyncDeltaStream
from .build import (GenerationParams, build_embed_request, build_generate_request, build_parameters, build_qa_request,
                    build_tokenize_request)
from .client import Client, DeltaStream
from .errors import (AuthenticationError, CancelledError, DeadlineError, OverloadedError, Qwen2Error,
                     ServerError, UnavailableError, UnsupportedTaskError, ValidationError, error_from_rpc,
                     error_from_status)
from .retry import RetryPolicy
from .types import (Classification, Delta, Embedding, FinalInfo, ModelInfo, QAResult, Result, Timings,
                    TokenClassification, TokenizeResult, TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Usage)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "AsyncDeltaStream", "AuthenticationError", "CancelledError", "Classification", "Client",
    "DeadlineError", "Delta", "DeltaStream", "Embedding", "FinalInfo", "GenerationParams", "ModelInfo",
    "OverloadedError", "QAResult", "Qwen2Error", "Result", "RetryPolicy", "ServerError", "Timings",
    "TokenClassification", "TokenLogprob", "TokenizeResult", "ToolCall", "ToolCallDelta", "TopLogprob",
    "UnavailableError", "UnsupportedTaskError", "Usage", "ValidationError", "build_embed_request",
    "build_generate_request", "build_parameters", "build_qa_request", "build_tokenize_request", "error_from_rpc",
    "error_from_status", "__version__",
]
