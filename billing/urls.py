from django.urls import path

from billing import api

v1_urlpatterns = [
    path("usage", api.UsageView.as_view(), name="usage"),
    path("billing/balance", api.BalanceView.as_view(), name="billing-balance"),
    path("billing/ledger", api.LedgerView.as_view(), name="billing-ledger"),
    path("billing/top-up", api.TopUpView.as_view(), name="billing-top-up"),
    path("billing/limits", api.LimitsView.as_view(), name="billing-limits"),
]
