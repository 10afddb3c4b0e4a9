"""docpipe: documents through OCR, extraction and moderation providers, inside their limits.

    import pipeline
    batch = pipeline.ingest("s3://inbox/scans/", provider="baidu")   # a named batch, listed page by page
    print(batch.name, batch.status().counts)
    for handle, result in batch.results():                            # as each document ends
        print(handle.source, result)

    handle = pipeline.enqueue("invoice.pdf", provider="baidu")        # one document
    result = handle.wait(timeout=300)
"""

from pipeline.batches import Batch, ingest
from pipeline.enqueue import DocumentFailedError, Enqueued, JobHandle, enqueue, enqueue_many

__all__ = ["Batch", "DocumentFailedError", "Enqueued", "JobHandle", "enqueue", "enqueue_many", "ingest"]
