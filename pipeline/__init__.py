"""docpipe: documents through OCR, extraction and moderation providers, inside their limits.

    from pipeline import enqueue
    handle = enqueue("invoice.pdf", provider="baidu")
    result = handle.wait(timeout=300)
"""

from pipeline.enqueue import DocumentFailedError, JobHandle, enqueue

__all__ = ["DocumentFailedError", "JobHandle", "enqueue"]
