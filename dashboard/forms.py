from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from typing import Any, cast

from django import forms
from django.contrib.auth import forms as auth_forms
from django.contrib.auth.password_validation import validate_password

from accounts.login_protection import may_email
from accounts.models import Role, Scope, User


class SignUpForm(forms.Form):
    """Who signs up: the emailed link proves the address, and a password is chosen there.

    Whether the address already has an account is never checked here: the form answers the same either way.
    """

    name = forms.CharField(max_length=150, required=False)
    email = forms.EmailField()

    def clean_email(self) -> str:
        return str(User.objects.normalize_email(self.cleaned_data["email"])).lower()


class ChoosePasswordForm(forms.Form):
    """The password of an account being created from a sign-up link."""

    password = forms.CharField(widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}), strip=False)

    def __init__(self, *args: Any, email: str, name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.person = User(email=email, name=name)

    def clean_password(self) -> str:
        password = str(self.cleaned_data["password"])
        validate_password(password, self.person)
        return password


def _folded(email: str) -> str:
    return unicodedata.normalize("NFKC", email).casefold()


RESET_EMAIL_TEMPLATE = "dashboard/auth/password_reset_email.txt"


class PasswordResetForm(auth_forms.PasswordResetForm):
    """Django's, with the emails to any one address capped (silently: the page answers the same), and sent to an
    account with no password yet: a person invited to an organization (``dashboard.views.team.invite``) who lost
    the invitation or let its link expire claims the address this way. Django's leaves such accounts out (it takes
    "no usable password" to mean "signs in another way"), and nothing else here could ever reach them: the
    address would be held for good by whoever invited it.

    The page only checks the address; a worker looks it up and sends the link (``send_password_reset_email``), so
    the request takes as long for an address with an account as for one without."""

    def get_users(self, email: str) -> Iterator[Any]:
        people = User.objects.filter(email__iexact=email, is_active=True)
        for user in people:
            # The same address, not one the database's case-insensitive match merely finds alike (as Django compares).
            if _folded(email) == _folded(user.email) and may_email(email):
                yield user


def send_password_reset_email(*, email: str, domain: str, use_https: bool) -> None:
    """The worker's half of a password reset (``dashboard.tasks``): looks the address up and emails each account that
    has it a link on ``domain``, the host the reset was asked on; nothing for an address with no account."""
    form = PasswordResetForm({"email": email})
    if form.is_valid():
        form.save(domain_override=domain, use_https=use_https, email_template_name=RESET_EMAIL_TEMPLATE)


class _RolesGiven(forms.Form):
    """A form naming a role: offered, and accepted, only among ``roles`` (the roles the member filling it may give,
    ``dashboard.access.Context.givable_roles``); all of them when not given."""

    role = forms.ChoiceField(choices=Role.choices)

    def __init__(self, *args: Any, roles: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if roles is not None:
            field = cast(forms.ChoiceField, self.fields["role"])
            field.choices = [(value, label) for value, label in Role.choices if value in roles]


class InviteForm(_RolesGiven):
    email = forms.EmailField()
    field_order = ("email", "role")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["role"].initial = Role.DEVELOPER


class RoleForm(_RolesGiven):
    pass


class KeyForm(forms.Form):
    name = forms.CharField(max_length=100, initial="My key")
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices, initial=[Scope.INFERENCE], widget=forms.CheckboxSelectMultiple
    )

    def __init__(self, *args: Any, grantable: frozenset[str] | None = None, **kwargs: Any) -> None:
        """``grantable``: the scopes the member's role may grant (accounts.policy); only those are offered."""
        super().__init__(*args, **kwargs)
        if grantable is not None:
            field = cast(forms.MultipleChoiceField, self.fields["scopes"])
            field.choices = [(value, label) for value, label in Scope.choices if value in grantable]


class DateRangeForm(forms.Form):
    start = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        start, end = cleaned.get("start"), cleaned.get("end")
        if start and end and start > end:
            raise forms.ValidationError("The start must be on or before the end.")
        if start and end and (end - start).days > 365:
            raise forms.ValidationError("Show at most a year at a time.")
        return cleaned


class TopUpForm(forms.Form):
    enabled = forms.BooleanField(required=False, label="Top up automatically")
    threshold_dollars = forms.DecimalField(
        min_value=0, max_digits=9, decimal_places=2, label="When available falls below ($)"
    )
    amount_dollars = forms.DecimalField(min_value=5, max_value=10_000, max_digits=7, decimal_places=2, label="Buy ($)")


class BuyCreditsForm(forms.Form):
    amount_dollars = forms.DecimalField(min_value=5, max_value=10_000, max_digits=7, decimal_places=2, initial=20)


class BillingDetailsForm(forms.Form):
    legal_name = forms.CharField(max_length=200, required=False, help_text="Empty: the organization's name is printed.")
    address = forms.CharField(
        max_length=500, required=False, widget=forms.Textarea(attrs={"rows": 4}), help_text="As it is printed."
    )
    tax_id = forms.CharField(max_length=64, required=False, label="Tax ID", help_text="VAT number, EIN, ABN...")


def _dollars(label: str, help_text: str = "") -> forms.DecimalField:
    """An amount of money in dollars, to the micro-dollar; empty for none."""
    return forms.DecimalField(
        required=False, min_value=0, max_digits=16, decimal_places=6, label=label, help_text=help_text
    )


class ThresholdsField(forms.CharField):
    """Percentages as people type them: ``50, 80, 100``."""

    def to_python(self, value: Any) -> list[int]:  # type: ignore[override]
        text = str(super().to_python(value) or "")
        parts = [part.strip().rstrip("%").strip() for part in text.replace(";", ",").split(",") if part.strip()]
        try:
            values = [int(part) for part in parts]
        except ValueError:
            raise forms.ValidationError("Whole percentages separated by commas, e.g. 50, 80, 100.") from None
        if len(values) > 10 or any(not 1 <= value <= 100 for value in values):
            raise forms.ValidationError("Up to 10 whole percentages from 1 to 100.")
        return sorted(set(values))


class SpendSettingsForm(forms.Form):
    """The monthly budget and what spend alerts watch (billing.controls)."""

    budget_dollars = _dollars("Monthly budget ($)", "Spend allowed per calendar month (UTC); empty for none.")
    budget_thresholds = ThresholdsField(
        required=False, label="Alert at these % of the budget", help_text="e.g. 50, 80, 100; empty for none."
    )
    key_thresholds = ThresholdsField(
        required=False,
        label="Alert at these % of a key's or member's limit",
        help_text="e.g. 50, 80, 100; empty for none.",
    )
    credit_floor_dollars = _dollars("Alert when available credit falls below ($)", "Empty for no alert.")
    webhook_url = forms.URLField(
        required=False,
        max_length=2000,
        assume_scheme="https",
        label="Billing webhook URL",
        help_text="billing.threshold_reached, billing.budget_exhausted and billing.credits_low are POSTed here.",
    )


class KeyLimitForm(forms.Form):
    limit_dollars = _dollars("Monthly limit ($)", "Empty for no limit.")


class MemberLimitForm(forms.Form):
    limit_dollars = _dollars("Monthly limit ($)", "Empty for no limit.")


class EndUserLimitForm(forms.Form):
    end_user = forms.CharField(max_length=64, label="End user tag", help_text="The X-Fal-End-User value.")
    limit_dollars = _dollars("Monthly limit ($)", "Empty removes the limit.")
