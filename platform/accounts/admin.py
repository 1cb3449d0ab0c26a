"""The operators' console for the platform core: people, organizations, memberships, API keys, the audit log.

Changes that have a domain rule or an audit trail go through ``accounts.services`` (sign-up, deactivation,
organization creation, members and their roles, limits, suspension, key changes and revocation); the admin collects
input, shows the outcome and never writes the audit log itself. Key secrets never appear here: only the hint,
because the hash is as good as the secret to anyone holding the table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import quote
from django.contrib.admin.widgets import AutocompleteSelect
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from accounts.models import ApiKey, AuditEvent, Membership, Organization, Role, User
from accounts.services import (
    AccountsError,
    Actor,
    add_member,
    change_member_role,
    create_organization,
    deactivate_user,
    remove_member,
    revoke_api_key,
    set_concurrency_limit,
    set_organization_suspended,
    sign_up,
    update_api_key,
    validate_expires_at,
)

if TYPE_CHECKING:
    _ServiceAdminBase = admin.ModelAdmin[Any]
    _UserAdminBase = DjangoUserAdmin[User]
    _UserAddFormBase = AdminUserCreationForm[User]
    _UserChangeFormBase = UserChangeForm[User]
    _OrganizationAdminBase = admin.ModelAdmin[Organization]
    _OrganizationFormBase = forms.ModelForm[Organization]
    _MembershipAdminBase = admin.ModelAdmin[Membership]
    _MembershipFormBase = forms.ModelForm[Membership]
    _MembershipOfUserInlineBase = admin.TabularInline[Membership, User]
    _MembershipOfOrganizationInlineBase = admin.TabularInline[Membership, Organization]
    _ApiKeyOfOrganizationInlineBase = admin.TabularInline[ApiKey, Organization]
    _ApiKeyAdminBase = admin.ModelAdmin[ApiKey]
    _ApiKeyFormBase = forms.ModelForm[ApiKey]
    _AuditEventAdminBase = admin.ModelAdmin[AuditEvent]
else:
    # The stubs make these generic; Django's classes take no type arguments at runtime.
    _ServiceAdminBase = admin.ModelAdmin
    _UserAdminBase = DjangoUserAdmin
    _UserAddFormBase = AdminUserCreationForm
    _UserChangeFormBase = UserChangeForm
    _OrganizationAdminBase = _MembershipAdminBase = _ApiKeyAdminBase = _AuditEventAdminBase = admin.ModelAdmin
    _OrganizationFormBase = _MembershipFormBase = _ApiKeyFormBase = forms.ModelForm
    _MembershipOfUserInlineBase = _MembershipOfOrganizationInlineBase = admin.TabularInline
    _ApiKeyOfOrganizationInlineBase = admin.TabularInline

# Set on the request when a service refused the change, so the view stays put instead of reporting success.
_REFUSED = "_accounts_change_refused"


def request_actor(request: HttpRequest) -> Actor:
    """The operator behind an admin request, as the audit log records them."""
    user = request.user if isinstance(request.user, User) else None
    return Actor(user=user, ip_address=request.META.get("REMOTE_ADDR") or None)


def _count_per_organization(queryset: QuerySet[Any]) -> Coalesce:
    """A correlated COUNT for each organization row: one query per page, and no join of two fan-outs."""
    counted = queryset.filter(organization=OuterRef("pk")).order_by().values("organization")
    return Coalesce(Subquery(counted.annotate(n=Count("pk")).values("n"), output_field=IntegerField()), Value(0))


def _orphaning_removals(memberships: Iterable[Membership]) -> list[str]:
    """Why removing these memberships must be refused: each one that is the last owner of its organization.

    For the delete confirmation page, which lists what is protected before anything happens; remove_member
    applies the same rule, under lock, when the deletion is carried out.
    """
    leaving = [m for m in memberships if m.role == Role.OWNER]
    if not leaving:
        return []
    organization_ids = {m.organization_id for m in leaving}
    still_owned = set(
        Membership.objects.filter(organization_id__in=organization_ids, role=Role.OWNER)
        .exclude(pk__in=[m.pk for m in leaving])
        .values_list("organization_id", flat=True)
    )
    return [
        f"{m.user} is the only owner of {m.organization}: make someone else owner first, or delete the organization"
        for m in leaving
        if m.organization_id not in still_owned
    ]


def _refused(request: HttpRequest) -> bool:
    return bool(getattr(request, _REFUSED, False))


class _ServiceAdmin(_ServiceAdminBase):
    """An admin whose saves and deletes go through services, which may refuse: a domain rule the form cannot see,
    or a race past the form's own checks. A refusal is shown as an error; the view then saves, records and
    reports nothing more and goes back to the page it came from."""

    def refuse(self, request: HttpRequest, message: str) -> None:
        messages.error(request, message)
        setattr(request, _REFUSED, True)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: Any) -> None:
        if not _refused(request):
            super().save_related(request, form, formsets, change)

    def construct_change_message(
        self, request: HttpRequest, form: forms.Form, formsets: Iterable[Any], add: bool = False
    ) -> list[dict[str, dict[str, list[str]]]]:
        if _refused(request):
            return []
        return super().construct_change_message(request, form, formsets, add)

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> LogEntry:
        if _refused(request):
            return LogEntry(change_message=message)  # nothing was added: not saved
        return super().log_addition(request, obj, message)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> LogEntry:
        if _refused(request):
            return LogEntry(change_message=message)  # nothing was changed: not saved
        return super().log_change(request, obj, message)

    def response_add(self, request: HttpRequest, obj: Any, post_url_continue: str | None = None) -> HttpResponse:
        if _refused(request):
            return HttpResponseRedirect(request.get_full_path())
        return super().response_add(request, obj, post_url_continue)

    def response_change(self, request: HttpRequest, obj: Any) -> HttpResponse:
        if _refused(request):
            # Back to the form, which shows what is stored; the error message says why.
            return HttpResponseRedirect(request.get_full_path())
        return super().response_change(request, obj)

    def response_delete(self, request: HttpRequest, obj_display: str, obj_id: Any) -> HttpResponse:
        if _refused(request):
            opts = self.opts
            return HttpResponseRedirect(
                reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(obj_id)])
            )
        return super().response_delete(request, obj_display, obj_id)


class _IsSetFilter(admin.SimpleListFilter):
    """Yes/no on whether a nullable timestamp is set (suspended, revoked)."""

    field_name: str

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.filter(**{f"{self.field_name}__isnull": False})
        if self.value() == "no":
            return queryset.filter(**{f"{self.field_name}__isnull": True})
        return queryset


class SuspendedFilter(_IsSetFilter):
    title = "suspended"
    parameter_name = "suspended"
    field_name = "suspended_at"


class RevokedFilter(_IsSetFilter):
    title = "revoked"
    parameter_name = "revoked"
    field_name = "revoked_at"


def _clean_new_email(email: str, *, exclude_pk: int | None = None) -> str:
    # Emails are stored lower-cased (sign_up, the manager); compare the same way so case variants can't coexist.
    email = User.objects.normalize_email(email).lower()
    others = User.objects.filter(email__iexact=email)
    if exclude_pk is not None:
        others = others.exclude(pk=exclude_pk)
    if others.exists():
        raise forms.ValidationError("An account with this email address already exists.", code="unique")
    return email


# --- People -------------------------------------------------------------------------------------------------


class UserAddForm(_UserAddFormBase):
    """Email and password (or none: the person then sets one by a reset); the rest is edited afterwards."""

    class Meta:
        model = User
        fields = ("email", "name")

    def clean_email(self) -> str:
        return _clean_new_email(self.cleaned_data["email"])


class UserEditForm(_UserChangeFormBase):
    class Meta:
        model = User
        fields = ("email",)

    def clean_email(self) -> str:
        return _clean_new_email(self.cleaned_data["email"], exclude_pk=self.instance.pk)


class MembershipOfUserInline(_MembershipOfUserInlineBase):
    """Where this person belongs. Roles change on the membership's own page, which applies the owner rule."""

    model = Membership
    fk_name = "user"
    fields = ("organization", "role", "created_at")
    readonly_fields = ("organization", "role", "created_at")
    extra = 0
    can_delete = False
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        # Each row's title is the membership's str(), which names both ends.
        return super().get_queryset(request).select_related("user", "organization")

    def has_add_permission(self, request: HttpRequest, obj: User | None) -> bool:  # type: ignore[override]
        return False

    def has_change_permission(self, request: HttpRequest, obj: User | None = None) -> bool:
        return False


@admin.register(User)
class UserAdmin(_ServiceAdmin, _UserAdminBase):
    form = UserEditForm
    add_form = UserAddForm
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Personal info", {"fields": ("name",)}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("email", "name", "usable_password", "password1", "password2")}),
    )
    readonly_fields = ("last_login", "date_joined")
    list_display = ("email", "name", "is_active", "is_staff", "is_superuser", "date_joined", "last_login")
    list_filter = ("is_staff", "is_active", "is_superuser", "groups")
    search_fields = ("email", "name")
    ordering = ("email",)
    inlines = (MembershipOfUserInline,)
    actions = ("deactivate_selected",)

    def get_inlines(self, request: HttpRequest, obj: User | None) -> tuple[type[MembershipOfUserInline], ...]:
        # A new person's only membership is the personal organization that sign_up creates.
        return () if obj is None else (MembershipOfUserInline,)

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: Any) -> None:
        if change:
            if "is_active" in form.changed_data and not obj.is_active:
                # Through deactivate_user, which applies the ownership rule and suspends their solo organizations.
                try:
                    deactivate_user(user=obj, actor=request_actor(request))
                except AccountsError as error:
                    self.refuse(request, f"{obj} was not deactivated: {error}")
                    return
                columns = {field.name for field in User._meta.concrete_fields}
                others = [name for name in form.changed_data if name in columns and name != "is_active"]
                if others:
                    obj.save(update_fields=others)
                return
            super().save_model(request, obj, form, change)
            return
        # Through sign_up, so the person gets a personal organization and the audit log a sign-up row.
        password = form.cleaned_data.get("password1") if form.cleaned_data.get("set_usable_password", True) else None
        created = sign_up(email=obj.email, password=password or None, name=obj.name, actor=request_actor(request))
        # The add view goes on with ``obj`` (log entry, redirect to its change page): make it the stored row.
        obj.pk = created.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def get_deleted_objects(
        self, objs: Sequence[User] | QuerySet[User], request: HttpRequest
    ) -> tuple[list[str], dict[str, int], set[str], list[str]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        ownerships = Membership.objects.filter(user__in=list(objs), role=Role.OWNER).select_related(
            "user", "organization"
        )
        # Keys belong to organizations, so an ownerless one would keep working with nobody to answer for it.
        return deleted, counts, perms_needed, [*protected, *_orphaning_removals(ownerships)]

    @admin.action(description="Deactivate selected users", permissions=["change"])
    def deactivate_selected(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        actor = request_actor(request)
        candidates = list(queryset.filter(is_active=True))
        deactivated = 0
        for user in candidates:
            try:
                deactivate_user(user=user, actor=actor)
            except AccountsError as error:
                self.message_user(request, f"{user} stays active: {error}", messages.ERROR)
            else:
                deactivated += 1
        unchanged = queryset.count() - len(candidates)
        note = f" ({unchanged} already inactive)" if unchanged else ""
        self.message_user(request, f"Deactivated {deactivated} user(s){note}.", messages.SUCCESS)


# --- Organizations ------------------------------------------------------------------------------------------


class OrganizationAddForm(_OrganizationFormBase):
    """A team organization for a customer, created with its first owner."""

    owner = forms.ModelChoiceField(
        queryset=User.objects.all(),
        widget=AutocompleteSelect(Membership._meta.get_field("user"), admin.site),
        help_text="Becomes the organization's owner.",
    )

    class Meta:
        model = Organization
        fields = ("name",)


class MembershipOfOrganizationForm(_MembershipFormBase):
    class Meta:
        model = Membership
        fields = ("user", "role")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            # A membership stays one person's; moving it to someone else would bypass the audit log. A plain
            # one-choice select shows who without the autocomplete widget's query per row.
            user_field = self.fields["user"]
            user_field.disabled = True
            user_field.widget = forms.Select(choices=[(self.instance.user_id, str(self.instance.user))])


class MembershipOfOrganizationInline(_MembershipOfOrganizationInlineBase):
    """Members; additions are audited and role changes go through the owner rule (see save_formset)."""

    model = Membership
    form = MembershipOfOrganizationForm
    fk_name = "organization"
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)
    autocomplete_fields = ("user",)
    extra = 0
    can_delete = False
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        # Each row's title is the membership's str(), which names both ends.
        return super().get_queryset(request).select_related("user", "organization")


class ApiKeyOfOrganizationInline(_ApiKeyOfOrganizationInlineBase):
    """The organization's keys, read-only: they are made where the secret can be shown once."""

    model = ApiKey
    fields = ("name", "status", "scope_list", "secret_hint", "requests_per_minute", "last_used_at", "expires_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "API keys"

    @admin.display(description="scopes")
    def scope_list(self, api_key: ApiKey) -> str:
        return ", ".join(api_key.scopes)

    def has_add_permission(self, request: HttpRequest, obj: Organization | None) -> bool:  # type: ignore[override]
        return False

    def has_change_permission(self, request: HttpRequest, obj: Organization | None = None) -> bool:
        return False


@admin.register(Organization)
class OrganizationAdmin(_ServiceAdmin, _OrganizationAdminBase):
    list_display = (
        "name",
        "slug",
        "is_personal",
        "concurrency_limit",
        "member_count",
        "active_key_count",
        "suspended",
        "created_at",
    )
    list_filter = ("is_personal", SuspendedFilter, "created_at")
    search_fields = ("name", "slug", "id")
    readonly_fields = ("id", "is_personal", "suspended_at", "created_at")
    fieldsets = (
        (None, {"fields": ("id", "name", "slug", "is_personal", "created_at")}),
        ("Limits", {"fields": ("concurrency_limit",)}),
        ("Status", {"fields": ("suspended_at",), "description": "Suspend or unsuspend from the list's actions."}),
    )
    add_fieldsets = ((None, {"fields": ("name", "owner")}),)
    inlines = (MembershipOfOrganizationInline, ApiKeyOfOrganizationInline)
    actions = ("suspend_selected", "unsuspend_selected")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                member_count=_count_per_organization(Membership.objects.all()),
                active_key_count=_count_per_organization(ApiKey.objects.usable()),
            )
        )

    @admin.display(description="members", ordering="member_count")
    def member_count(self, organization: Organization) -> int:
        return int(organization.member_count)  # type: ignore[attr-defined]

    @admin.display(description="active keys", ordering="active_key_count")
    def active_key_count(self, organization: Organization) -> int:
        return int(organization.active_key_count)  # type: ignore[attr-defined]

    @admin.display(description="suspended", boolean=True, ordering="suspended_at")
    def suspended(self, organization: Organization) -> bool:
        return organization.is_suspended

    def get_fieldsets(self, request: HttpRequest, obj: Organization | None = None) -> Any:
        return self.add_fieldsets if obj is None else super().get_fieldsets(request, obj)

    def get_form(
        self, request: HttpRequest, obj: Organization | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = OrganizationAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_inlines(self, request: HttpRequest, obj: Organization | None) -> Any:
        # A new organization's first member is its owner, chosen on the add form.
        return () if obj is None else self.inlines

    def save_model(self, request: HttpRequest, obj: Organization, form: Any, change: Any) -> None:
        actor = request_actor(request)
        if not change:
            created = create_organization(name=obj.name, owner=form.cleaned_data["owner"], actor=actor)
            # The add view goes on with ``obj`` (log entry, redirect): make it the stored row.
            obj.pk = created.pk
            obj.refresh_from_db()
            obj._state.adding = False
            return
        if "concurrency_limit" in form.changed_data:
            try:
                set_concurrency_limit(organization=obj, limit=obj.concurrency_limit, actor=actor)
            except AccountsError as error:
                self.refuse(request, f"The organization was not changed: {error}")
                return
        # Only the other edited columns: a full save would write back a suspended_at read before a concurrent
        # suspension, and the limit is the service's.
        others = [name for name in form.changed_data if name != "concurrency_limit"]
        if others:
            obj.save(update_fields=others)

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: Any) -> None:
        if formset.model is not Membership:
            super().save_formset(request, form, formset, change)
            return
        actor = request_actor(request)
        for membership in formset.save(commit=False):
            if membership._state.adding:
                try:
                    add_member(
                        organization=membership.organization, user=membership.user, role=membership.role, actor=actor
                    )
                except AccountsError as error:
                    messages.error(request, f"{membership.user} was not added: {error}")
        # Promotions to owner first, so handing ownership over in one save is not refused as removing the last owner.
        role_changes = [m for m, changed in formset.changed_objects if "role" in changed]
        for membership in sorted(role_changes, key=lambda m: m.role != Role.OWNER):
            try:
                change_member_role(membership=membership, role=membership.role, actor=actor)
            except AccountsError as error:
                messages.error(request, f"{membership.user} keeps the role they had: {error}")

    @admin.action(description="Suspend selected organizations", permissions=["change"])
    def suspend_selected(self, request: HttpRequest, queryset: QuerySet[Organization]) -> None:
        self._set_suspended(request, queryset, suspended=True)

    @admin.action(description="Unsuspend selected organizations", permissions=["change"])
    def unsuspend_selected(self, request: HttpRequest, queryset: QuerySet[Organization]) -> None:
        self._set_suspended(request, queryset, suspended=False)

    def _set_suspended(self, request: HttpRequest, queryset: QuerySet[Organization], *, suspended: bool) -> None:
        actor = request_actor(request)
        # The service changes only those not already in that state; these are listed first for the message.
        to_change = list(queryset.filter(suspended_at__isnull=suspended))
        for organization in to_change:
            set_organization_suspended(organization=organization, suspended=suspended, actor=actor)
        verb = "Suspended" if suspended else "Unsuspended"
        unchanged = queryset.count() - len(to_change)
        note = f" ({unchanged} already {'suspended' if suspended else 'active'})" if unchanged else ""
        self.message_user(request, f"{verb} {len(to_change)} organization(s){note}.", messages.SUCCESS)


# --- Memberships --------------------------------------------------------------------------------------------


@admin.register(Membership)
class MembershipAdmin(_ServiceAdmin, _MembershipAdminBase):
    list_display = ("user", "organization", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__email", "organization__name")
    list_select_related = ("user", "organization")
    autocomplete_fields = ("user", "organization")

    def get_fields(self, request: HttpRequest, obj: Membership | None = None) -> Any:
        return ("user", "organization", "role") if obj is None else ("user", "organization", "role", "created_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Membership | None = None) -> Any:
        # Once made, a membership only changes role; moving it between people or organizations is not a thing.
        return () if obj is None else ("user", "organization", "created_at")

    def save_model(self, request: HttpRequest, obj: Membership, form: Any, change: Any) -> None:
        actor = request_actor(request)
        if not change:
            try:
                created = add_member(organization=obj.organization, user=obj.user, role=obj.role, actor=actor)
            except AccountsError as error:
                self.refuse(request, f"The member was not added: {error}")
                return
            # The add view goes on with ``obj`` (log entry, redirect): make it the stored row.
            obj.pk = created.pk
            obj.refresh_from_db()
            obj._state.adding = False
            return
        if "role" not in form.changed_data:
            return
        try:
            change_member_role(membership=obj, role=obj.role, actor=actor)
        except AccountsError as error:
            self.refuse(request, f"The role was not changed: {error}")

    def get_deleted_objects(
        self, objs: Sequence[Membership] | QuerySet[Membership], request: HttpRequest
    ) -> tuple[list[str], dict[str, int], set[str], list[str]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, perms_needed, [*protected, *_orphaning_removals(objs)]

    def delete_model(self, request: HttpRequest, obj: Membership) -> None:
        # get_deleted_objects has refused a last owner already; this refusal is for one who became so meanwhile
        # (the delete view has written its log entry by now; the audit log has nothing).
        try:
            remove_member(membership=obj, actor=request_actor(request))
        except AccountsError as error:
            self.refuse(request, f"{obj.user} was not removed from {obj.organization}: {error}")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        actor = request_actor(request)
        for membership in queryset.select_related("user", "organization"):
            try:
                remove_member(membership=membership, actor=actor)
            except AccountsError as error:
                messages.error(request, f"{membership.user} was not removed from {membership.organization}: {error}")


# --- API keys -----------------------------------------------------------------------------------------------


class ApiKeyChangeForm(_ApiKeyFormBase):
    class Meta:
        model = ApiKey
        fields = ("name", "requests_per_minute", "expires_at")

    def clean_expires_at(self) -> datetime | None:
        expires_at: datetime | None = self.cleaned_data["expires_at"]
        if "expires_at" in self.changed_data:
            # The service's rule, shown on the field; a past expiry that is left as it is stays.
            try:
                validate_expires_at(expires_at)
            except AccountsError as error:
                raise forms.ValidationError(str(error), code="expired") from None
        return expires_at


@admin.register(ApiKey)
class ApiKeyAdmin(_ServiceAdmin, _ApiKeyAdminBase):
    list_display = (
        "name",
        "organization",
        "status",
        "scope_list",
        "secret_hint",
        "last_used_at",
        "expires_at",
        "created_at",
    )
    list_filter = (RevokedFilter, "created_at")
    search_fields = ("name", "id", "organization__name", "organization__slug")
    list_select_related = ("organization",)
    form = ApiKeyChangeForm
    # Listed explicitly so that secret_hash can never appear, whatever is added to the model later.
    fields = (
        "id",
        "organization",
        "name",
        "status",
        "scope_list",
        "secret_hint",
        "requests_per_minute",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "created_by",
        "created_at",
    )
    editable_fields = ("name", "requests_per_minute", "expires_at")
    readonly_fields = (
        "id",
        "organization",
        "status",
        "scope_list",
        "secret_hint",
        "revoked_at",
        "last_used_at",
        "created_by",
        "created_at",
    )
    actions = ("revoke_selected",)

    @admin.display(description="status")
    def status(self, api_key: ApiKey) -> str:
        return api_key.status

    @admin.display(description="scopes")
    def scope_list(self, api_key: ApiKey) -> str:
        return ", ".join(api_key.scopes)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Keys are made by the API and the dashboard, the only places that can show the secret once.
        return False

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: Any) -> None:
        changed = {name: getattr(obj, name) for name in self.editable_fields if name in form.changed_data}
        if not changed:
            return
        # The service writes only these columns and audits a change of rate or expiry.
        try:
            update_api_key(api_key=obj, actor=request_actor(request), **changed)
        except AccountsError as error:
            self.refuse(request, f"The key was not changed: {error}")

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        actor = request_actor(request)
        to_revoke = list(queryset.filter(revoked_at__isnull=True).select_related("organization"))
        for api_key in to_revoke:
            revoke_api_key(api_key=api_key, actor=actor)
        unchanged = queryset.count() - len(to_revoke)
        note = f" ({unchanged} already revoked)" if unchanged else ""
        self.message_user(request, f"Revoked {len(to_revoke)} key(s){note}.", messages.SUCCESS)


# --- Audit log ----------------------------------------------------------------------------------------------


@admin.register(AuditEvent)
class AuditEventAdmin(_AuditEventAdminBase):
    """Append-only: nobody edits or deletes history from the console."""

    list_display = (
        "created_at",
        "action",
        "organization",
        "actor_user",
        "actor_api_key",
        "target_type",
        "target",
        "ip_address",
    )
    list_filter = ("action", "created_at")
    date_hierarchy = "created_at"
    search_fields = ("target_id", "actor_user__email", "organization__name")
    list_select_related = ("organization", "actor_user", "actor_api_key")
    # The table only grows: skip the second COUNT(*) over all of it on every filtered page.
    show_full_result_count = False
    fields = (
        "created_at",
        "action",
        "organization",
        "actor_user",
        "actor_api_key",
        "ip_address",
        "target_type",
        "target",
        "metadata_json",
    )
    readonly_fields = fields

    @admin.display(description="target id", ordering="target_id")
    def target(self, event: AuditEvent) -> str:
        if not event.target_type or not event.target_id:
            return event.target_id or "-"
        app_label, _, model_name = event.target_type.partition(".")
        try:
            url = reverse(f"admin:{app_label}_{model_name}_change", args=[event.target_id])
        except NoReverseMatch:
            return event.target_id
        return format_html('<a href="{}">{}</a>', url, event.target_id)

    @admin.display(description="metadata")
    def metadata_json(self, event: AuditEvent) -> str:
        return format_html("<pre>{}</pre>", json.dumps(event.metadata, indent=2, sort_keys=True))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False
