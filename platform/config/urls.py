"""The root URLconf: every app's URLs meet here."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerSplitView

from billing import urls as billing_urls
from config import metrics, views
from dashboard import urls as dashboard_urls
from inference import fal_proxy
from inference import urls as inference_urls
from inference.webhook_signing import JwksView

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    # Prometheus, KEDA and alerts; bearer token METRICS_TOKEN (config/metrics.py).
    path("metrics", metrics.metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    # The public keys of webhook signatures, where fal serves its own (rest.fal.ai/.well-known/jwks.json).
    path(".well-known/jwks.json", JwksView.as_view(), name="jwks"),
    path("v1/openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    # Its script served apart (?script), and no inline style: the page keeps the site's Content-Security-Policy.
    path(
        "v1/docs",
        SpectacularSwaggerSplitView.as_view(url_name="openapi-schema", template_name="dashboard/api_docs.html"),
        name="api-docs",
    ),
    path("v1/", include("accounts.urls")),
    path("v1/", include(inference_urls.v1_urlpatterns)),
    path("v1/", include(billing_urls.v1_urlpatterns)),
    path("billing/stripe/", include(billing_urls.stripe_urlpatterns)),
    path("queue/", include(inference_urls.queue_urlpatterns)),
    path("run/", include(inference_urls.run_urlpatterns)),
    # fal's proxy protocol (@fal-ai/client's proxyUrl): inference/fal_proxy.py
    path("fal/proxy", fal_proxy.proxy, name="fal-proxy"),
    path("", include("inference.file_urls")),
    path("auth/", include(dashboard_urls.auth_urlpatterns)),
    path("dashboard/", include(dashboard_urls)),
    path("", RedirectView.as_view(pattern_name="dashboard:home", permanent=False), name="home"),
]

handler400 = "config.views.bad_request"
handler404 = "config.views.not_found"
handler500 = "config.views.server_error"
