from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        from django.db.models.signals import post_save

        from accounts.models import Organization
        from billing import admission, metering, signals, signup  # noqa: F401  (signals connects its receivers)
        from inference.hooks import register

        register(
            admit=admission.admit,
            admit_in_query=admission.admit_in_query,
            reserve=admission.reserve,
            may_continue=admission.may_continue,
            attempt_finished=metering.record_attempt,
            ended_unstarted=admission.ended_unstarted,
            usage=admission.job_usage,
            price=admission.endpoint_price,
        )
        post_save.connect(signup.open_account, sender=Organization, dispatch_uid="billing-open-account")
