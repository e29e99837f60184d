from __future__ import annotations

from django.urls import path

from examples.django_app import views

urlpatterns = [
    path("healthz", views.healthz),
    path("accounts", views.open_account),
    path("accounts/<int:account_id>", views.account),
    path("transfers", views.transfer),
    path("slow", views.slow),
    path("spawn", views.spawn),
    path("fail", views.fail),
    path("atomic-fail", views.atomic_fail),
    path("stats", views.stats),
]
