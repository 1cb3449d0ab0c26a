"""The forms of the console's pages for people, organizations and keys (accounts/admin.py).

They only validate what an operator typed; the form views hand the cleaned values to ``accounts.services``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin
from django.contrib.admin.widgets import AdminSplitDateTime, AutocompleteSelect
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.forms.models import inlineformset_factory

from accounts.models import ApiKey, Membership, Organization, User
from accounts.services import AccountsError, validate_expires_at

if TYPE_CHECKING:
    _UserAddFormBase = AdminUserCreationForm[User]
    _UserChangeFormBase = UserChangeForm[User]
    _OrganizationFormBase = forms.ModelForm[Organization]
    _MembershipFormBase = forms.ModelForm[Membership]
    _ApiKeyFormBase = forms.ModelForm[ApiKey]
else:
    # The stubs make these generic; Django's classes take no type arguments at runtime.
    _UserAddFormBase = AdminUserCreationForm
    _UserChangeFormBase = UserChangeForm
    _OrganizationFormBase = _MembershipFormBase = _ApiKeyFormBase = forms.ModelForm


def _user_picker() -> AutocompleteSelect:
    """A search box over people (the users' admin search) instead of a select with every person in it."""
    return AutocompleteSelect(Membership._meta.get_field("user"), admin.site)


def _clean_new_email(email: str, *, exclude_pk: int | None = None) -> str:
    # Emails are stored lower-cased (sign_up, the manager); compare the same way so case variants can't coexist.
    email = User.objects.normalize_email(email).lower()
    others = User.objects.filter(email__iexact=email)
    if exclude_pk is not None:
        others = others.exclude(pk=exclude_pk)
    if others.exists():
        raise forms.ValidationError("An account with this email address already exists.", code="unique")
    return email


class UserAddForm(_UserAddFormBase):
    """Email and password (or none: the person then sets one by a reset); the rest is edited afterwards."""

    field_order = ("email", "name", "usable_password", "password1", "password2")

    class Meta:
        model = User
        fields = ("email", "name")

    class Media:
        css = {"all": ["admin/css/unusable_password_field.css"]}  # hides the password fields when none is set

    def clean_email(self) -> str:
        return _clean_new_email(self.cleaned_data["email"])

    @property
    def password(self) -> str | None:
        """The password to sign up with; None when the person is to set one by a reset."""
        if not self.cleaned_data.get("set_usable_password", True):
            return None
        return self.cleaned_data.get("password1") or None


class UserEditForm(_UserChangeFormBase):
    class Meta:
        model = User
        fields = ("email",)

    def clean_email(self) -> str:
        return _clean_new_email(self.cleaned_data["email"], exclude_pk=self.instance.pk)


class OrganizationCreateForm(_OrganizationFormBase):
    """A team organization for a customer, made with its first owner."""

    owner = forms.ModelChoiceField(
        queryset=User.objects.all(), widget=_user_picker(), help_text="Becomes the organization's owner."
    )

    class Meta:
        model = Organization
        fields = ("name",)


class OrganizationForm(_OrganizationFormBase):
    class Meta:
        model = Organization
        fields = ("name", "slug", "concurrency_limit")


class MembershipOfOrganizationForm(_MembershipFormBase):
    class Meta:
        model = Membership
        fields = ("user", "role")
        widgets = {"user": _user_picker()}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            # A membership stays one person's: only its role changes. A plain one-choice select shows who without
            # the search box's query per row.
            user_field = self.fields["user"]
            user_field.disabled = True
            user_field.widget = forms.Select(choices=[(self.instance.user_id, str(self.instance.user))])


# An organization's members, each row's role editable, and one empty row to add someone.
MembershipFormSet = inlineformset_factory(
    Organization,
    Membership,
    form=MembershipOfOrganizationForm,
    fields=("user", "role"),
    extra=1,
    can_delete=False,
)


class ApiKeyForm(_ApiKeyFormBase):
    class Meta:
        model = ApiKey
        fields = ("name", "requests_per_minute", "expires_at")
        field_classes = {"expires_at": forms.SplitDateTimeField}
        widgets = {"expires_at": AdminSplitDateTime}

    def clean_expires_at(self) -> datetime | None:
        expires_at: datetime | None = self.cleaned_data["expires_at"]
        if "expires_at" in self.changed_data:
            # The service's rule, shown on the field; a past expiry that is left as it is stays.
            try:
                validate_expires_at(expires_at)
            except AccountsError as error:
                raise forms.ValidationError(str(error), code="expired") from None
        return expires_at
