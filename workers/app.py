"""The Celery application: ``celery -A workers worker -Q docpipe.baidu`` starts a worker."""

from celery import Celery

app = Celery("docpipe", include=["workers.tasks"])
app.config_from_object("celeryconfig")
