from __future__ import annotations

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


class PasswordResetForm(auth_forms.PasswordResetForm):
    """Django's, with the emails to any one address capped (silently: the page answers the same)."""

    def get_users(self, email: str) -> Iterator[Any]:
        for user in super().get_users(email):
            if may_email(email):
                yield user


class InviteForm(forms.Form):
    email = forms.EmailField()
    role = forms.ChoiceField(choices=Role.choices, initial=Role.DEVELOPER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


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
