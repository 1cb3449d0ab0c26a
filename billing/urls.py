from django.urls import path

from billing import api, documents_api, payment_api, pricing_api

# /v1/models itself is inference's (the catalogue); its pricing sub-paths are billing's.
v1_urlpatterns = [
    path("models/pricing", pricing_api.ModelPricingView.as_view(), name="models-pricing"),
    path("models/pricing/estimate", pricing_api.PricingEstimateView.as_view(), name="models-pricing-estimate"),
    path("usage", api.UsageView.as_view(), name="usage"),
    path("billing/balance", api.BalanceView.as_view(), name="billing-balance"),
    path("billing/ledger", api.LedgerView.as_view(), name="billing-ledger"),
    path("billing/top-up", api.TopUpView.as_view(), name="billing-top-up"),
    path("billing/limits", api.LimitsView.as_view(), name="billing-limits"),
    path("billing/alerts", api.AlertsView.as_view(), name="billing-alerts"),
    path("billing/alerts/settings", api.AlertSettingsView.as_view(), name="billing-alert-settings"),
    path("billing/payment-methods", payment_api.PaymentMethodsView.as_view(), name="billing-payment-methods"),
    path(
        "billing/payment-methods/<str:payment_method_id>",
        payment_api.PaymentMethodView.as_view(),
        name="billing-payment-method",
    ),
    path(
        "billing/payment-methods/<str:payment_method_id>/default",
        payment_api.DefaultPaymentMethodView.as_view(),
        name="billing-payment-method-default",
    ),
    path("billing/purchases", payment_api.PurchasesView.as_view(), name="billing-purchases"),
    path(
        "billing/purchases/<int:payment_id>/receipt",
        documents_api.PaymentReceiptView.as_view(),
        name="billing-purchase-receipt",
    ),
    path("billing/receipts", documents_api.ReceiptsView.as_view(), name="billing-receipts"),
    path("billing/receipts/<int:receipt_id>", documents_api.ReceiptView.as_view(), name="billing-receipt"),
    path("billing/statements", documents_api.StatementsView.as_view(), name="billing-statements"),
    path("billing/statements/<str:month>", documents_api.StatementView.as_view(), name="billing-statement"),
    path("billing/details", documents_api.BillingDetailsView.as_view(), name="billing-details"),
]

# Mounted at /billing/stripe/ (outside /v1: Stripe signs its deliveries; no key, no session, no CSRF).
stripe_urlpatterns = [
    path("webhook", payment_api.stripe_webhook, name="stripe-webhook"),
]
