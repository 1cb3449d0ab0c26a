from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and access"

    def ready(self) -> None:
        from accounts import schema, signals  # noqa: F401  (login-failure audit, OpenAPI auth scheme)
        from config import checks  # noqa: F401  (the deployment checks of Django's middleware under our names)
