"""docpipe: documents through OCR, extraction and moderation providers, inside their limits.

    from pipeline import enqueue, enqueue_many
    handle = enqueue("invoice.pdf", provider="baidu")
    result = handle.wait(timeout=300)

    for sent in enqueue_many(paths, provider="tuputech"):   # a batch, 8 at a time
        print(sent.source, sent.handle or sent.error)
"""

from pipeline.enqueue import DocumentFailedError, Enqueued, JobHandle, enqueue, enqueue_many

__all__ = ["DocumentFailedError", "Enqueued", "JobHandle", "enqueue", "enqueue_many"]
