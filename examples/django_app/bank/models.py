"""Accounts and transfers: the same small bank as the Flask example."""

from __future__ import annotations

from django.db import models


class Account(models.Model):
    owner = models.TextField()
    balance = models.DecimalField(max_digits=14, decimal_places=2, default=0)

    class Meta:
        app_label = "bank"


class Transfer(models.Model):
    source = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="sent")
    target = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="received")
    amount = models.DecimalField(max_digits=14, decimal_places=2)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "bank"
