"""The operators' console for the platform core: people, organizations, memberships, API keys, the audit log.

Changes that have a domain rule or an audit trail go through ``accounts.services`` (sign-up, deactivation,
organization creation, members and their roles, limits, suspension, key changes and revocation), from actions and
form views (accounts/admin_base.py); the admin collects input, shows the outcome and never writes the audit log
itself. A person's own columns (name, email, staff rights, password) are edited on Django's user page. Key secrets
never appear here: only the hint, because the hash is as good as the secret to anyone holding the table.

Another app shows its side of an organization on the organizations' pages through ``add_organization_section``,
so that this module imports nothing above the platform core.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin as DjangoGroupAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import PermissionDenied
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import NoReverseMatch, URLPattern, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.views.decorators.debug import sensitive_post_parameters

from accounts import key_cache
from accounts.admin_base import FormViewsAdmin, OperableAdmin, Tool, form_data, request_actor
from accounts.admin_forms import (
    ApiKeyForm,
    MembershipFormSet,
    OrganizationCreateForm,
    OrganizationForm,
    UserAddForm,
    UserEditForm,
)
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
)

if TYPE_CHECKING:
    from django.forms.models import BaseInlineFormSet

    _UserAdminBase = DjangoUserAdmin[User]
    _GroupAdminBase = DjangoGroupAdmin
    _MembershipOfUserInlineBase = admin.TabularInline[Membership, User]
    _MembershipOfOrganizationInlineBase = admin.TabularInline[Membership, Organization]
    _ApiKeyOfOrganizationInlineBase = admin.TabularInline[ApiKey, Organization]
else:
    # The stubs make these generic; Django's classes take no type arguments at runtime.
    _UserAdminBase = DjangoUserAdmin
    _GroupAdminBase = DjangoGroupAdmin
    _MembershipOfUserInlineBase = _MembershipOfOrganizationInlineBase = admin.TabularInline
    _ApiKeyOfOrganizationInlineBase = admin.TabularInline


def _count_per_organization(queryset: QuerySet[Any]) -> Coalesce:
    """A correlated COUNT for each organization row: one query per page, and no join of two fan-outs."""
    counted = queryset.filter(organization=OuterRef("pk")).order_by().values("organization")
    return Coalesce(Subquery(counted.annotate(n=Count("pk")).values("n"), output_field=IntegerField()), Value(0))


def _orphaning_removals(memberships: Iterable[Membership]) -> list[str]:
    """Why removing these memberships must be refused: each one that is the last owner of its organization.

    For the pages that ask before a removal or a deletion, which list what is refused before anything happens;
    remove_member applies the same rule, under lock, when the removal is carried out.
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


# --- People -------------------------------------------------------------------------------------------------


class MembershipOfUserInline(_MembershipOfUserInlineBase):
    """Where this person belongs. Roles change on the organization's edit page, which applies the owner rule."""

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


# What only a superuser may set on a person: the power to do anything, and the groups and permissions that grant it.
SUPERUSER_ONLY_FIELDS = ("is_superuser", "groups", "user_permissions")


def _permissions_of(person: User) -> set[str]:
    """Every permission ``person`` holds, their own and their groups', as ``app_label.codename``, whether or not they
    are active now: Django's ``get_all_permissions`` answers nothing for an inactive person, whom an operator may
    reactivate from the list."""
    held = Permission.objects.filter(Q(user=person) | Q(group__user=person)).values_list(
        "content_type__app_label", "codename"
    )
    return {f"{app_label}.{codename}" for app_label, codename in held}


def outranks(person: User, operator: Any) -> bool:
    """Whether ``person`` holds power ``operator`` lacks: a superuser, or a permission the operator has not.

    An operator who could set such a person's password or address (then reset it) could log in as them and use that
    power: "change user" alone would be every permission of every other operator."""
    if operator.is_superuser:
        return False
    return person.is_superuser or not _permissions_of(person) <= operator.get_all_permissions()


@admin.register(User)
class UserAdmin(FormViewsAdmin, _UserAdminBase):
    """A person's own columns are edited on Django's user page. Adding someone (``sign_up``, which makes their
    personal organization) and deactivating them (``deactivate_user``, which applies the ownership rule) are form
    views and actions."""

    form = UserEditForm
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Personal info", {"fields": ("name",)}),
        (
            "Permissions",
            {
                "fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions"),
                "description": "Deactivate with the Deactivate button above, or from the list's actions.",
            },
        ),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    readonly_fields = ("is_active", "last_login", "date_joined")
    list_display = ("email", "name", "is_active", "is_staff", "is_superuser", "date_joined", "last_login")
    list_filter = ("is_staff", "is_active", "is_superuser", "groups")
    search_fields = ("email", "name")
    ordering = ("email",)
    inlines = (MembershipOfUserInline,)
    actions = ("deactivate_selected", "reactivate_selected")

    def get_urls(self) -> list[URLPattern]:
        return [
            self.form_view_path("sign-up/", self.sign_up_view, "sign_up"),
            self.form_view_path("<path:object_id>/deactivate/", self.deactivate_view, "deactivate"),
            *super().get_urls(),
        ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # people are added by the sign-up form view

    def get_readonly_fields(self, request: HttpRequest, obj: User | None = None) -> tuple[str, ...]:
        # Only a superuser grants power: with "change user" alone an operator could tick is_superuser, or give
        # anyone (themselves included) any group or permission.
        readonly = tuple(super().get_readonly_fields(request, obj))
        if request.user.is_superuser:
            return readonly
        return (*readonly, *SUPERUSER_ONLY_FIELDS)

    def has_change_permission(self, request: HttpRequest, obj: User | None = None) -> bool:
        # Nor may they change anyone who holds power they lack, a superuser or another operator with more permissions
        # (their address, their password on Django's password page): either would let them log in as that person.
        if obj is not None and outranks(obj, request.user):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: User | None = None) -> bool:
        if obj is not None and outranks(obj, request.user):
            return False
        return super().has_delete_permission(request, obj)

    def get_list_tools(self, request: HttpRequest) -> list[Tool]:
        return [Tool("Add user", self.form_view_url("sign_up"))] if self.has_create_permission(request) else []

    def get_object_tools(self, request: HttpRequest, obj: User) -> list[Tool]:
        if not (obj.is_active and self.has_operate_permission(request)):
            return []
        return [Tool("Deactivate", self.form_view_url("deactivate", obj.pk))]

    @method_decorator(sensitive_post_parameters())
    def sign_up_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_create_permission(request):
            raise PermissionDenied
        form = UserAddForm(form_data(request))
        if form.is_valid():
            try:
                user = sign_up(
                    email=form.cleaned_data["email"],
                    password=form.password,
                    name=form.cleaned_data["name"],
                    actor=request_actor(request),
                )
            except AccountsError as error:  # the same address, signed up meanwhile
                form.add_error("email", str(error))
            else:
                self.log_addition(request, user, [{"added": {}}])
                self.message_user(request, f"Added {user}, with their personal organization.", messages.SUCCESS)
                return self.change_page(user)
        return self.render_form_view(
            request,
            title="Add user",
            form=form,
            intro="The person gets a personal organization, which they own. Staff rights and the rest are set on "
            "their page afterwards.",
            submit_label="Add user",
        )

    def deactivate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        user: User = self.object_to_operate(request, object_id)
        if not self.has_change_permission(request, user):
            raise PermissionDenied  # a superuser, and the operator is not one
        if request.method == "POST":
            if not user.is_active:
                self.message_user(request, f"{user} is already inactive.", messages.INFO)
                return self.change_page(user)
            try:
                deactivate_user(user=user, actor=request_actor(request))
            except AccountsError as error:
                self.message_user(request, f"{user} was not deactivated: {error}", messages.ERROR)
            else:
                self.log_change(request, user, [{"changed": {"fields": ["is_active"]}}])
                self.message_user(request, f"Deactivated {user}.", messages.SUCCESS)
            return self.change_page(user)
        return self.render_form_view(
            request,
            title="Deactivate",
            form=forms.Form(),
            obj=user,
            intro=f"{user} will no longer be able to log in, and organizations where they are the only member are "
            "suspended. Refused while they are the only owner of an organization with other members.",
            refusal="" if user.is_active else f"{user} is already inactive.",
            submit_label="Deactivate",
        )

    def get_deleted_objects(
        self, objs: Sequence[User] | QuerySet[User], request: HttpRequest
    ) -> tuple[list[str], dict[str, int], set[str], list[str]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        ownerships = Membership.objects.filter(user__in=list(objs), role=Role.OWNER).select_related(
            "user", "organization"
        )
        # Keys belong to organizations, so an ownerless one would keep working with nobody to answer for it.
        return deleted, counts, perms_needed, [*protected, *_orphaning_removals(ownerships)]

    def _changeable(self, request: HttpRequest, queryset: QuerySet[User]) -> QuerySet[User]:
        """The selected people this operator may change: those who hold power the operator lacks (``outranks``) are
        left out, and said so, unless the operator is a superuser."""
        if request.user.is_superuser:
            return queryset
        # Only someone with a permission or superuser status can outrank anyone.
        empowered = queryset.filter(
            Q(is_superuser=True) | Q(user_permissions__isnull=False) | Q(groups__permissions__isnull=False)
        ).distinct()
        skipped = [person.pk for person in empowered if outranks(person, request.user)]
        if skipped:
            note = f"{len(skipped)} person(s) left as they are: they hold power you lack (a superuser may change them)."
            self.message_user(request, note, messages.WARNING)
        return queryset.exclude(pk__in=skipped)

    @admin.action(description="Deactivate selected users", permissions=["operate"])
    def deactivate_selected(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        actor = request_actor(request)
        queryset = self._changeable(request, queryset)
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

    @admin.action(description="Reactivate selected users", permissions=["operate"])
    def reactivate_selected(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        # They may log in again; organizations suspended with them stay suspended until unsuspended.
        queryset = self._changeable(request, queryset)
        to_change = list(queryset.filter(is_active=False))
        User.objects.filter(pk__in=[user.pk for user in to_change]).update(is_active=True)
        key_cache.forget_all()  # their keys work again
        for user in to_change:
            self.log_change(request, user, [{"changed": {"fields": ["is_active"]}}])
        unchanged = queryset.count() - len(to_change)
        note = f" ({unchanged} already active)" if unchanged else ""
        self.message_user(request, f"Reactivated {len(to_change)} user(s){note}.", messages.SUCCESS)


if admin.site.is_registered(Group):
    admin.site.unregister(Group)


@admin.register(Group)
class GroupAdmin(_GroupAdminBase):
    """Django's, except that only a superuser sets a group's permissions: an operator with "change group" could
    otherwise give a group they belong to any permission, themselves with it (the users' page already keeps
    ``groups`` and ``user_permissions`` to superusers, ``SUPERUSER_ONLY_FIELDS``)."""

    def get_readonly_fields(self, request: HttpRequest, obj: Group | None = None) -> tuple[str, ...]:
        readonly = tuple(super().get_readonly_fields(request, obj))
        return readonly if request.user.is_superuser else (*readonly, "permissions")


# --- Organizations ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrganizationSection:
    """What another app shows on the organizations' pages (billing: the credit), without accounts importing it.

    ``fields`` are read-only rows of a section titled ``title`` on an organization's page and ``columns`` are added
    to the list, each a function of the organization (decorated with ``admin.display``); ``related`` names what
    they read, loaded with the organizations (``select_related``).
    """

    title: str
    fields: tuple[Callable[[Organization], Any], ...] = ()
    columns: tuple[Callable[[Organization], Any], ...] = ()
    related: tuple[str, ...] = ()


_organization_sections: list[OrganizationSection] = []


def add_organization_section(section: OrganizationSection) -> None:
    """Shows ``section`` on the organizations' pages; called by another app's admin module as it loads."""
    _organization_sections.append(section)


class MembershipOfOrganizationInline(_MembershipOfOrganizationInlineBase):
    """Members; added and given roles on the organization's edit page, removed from a membership's page."""

    model = Membership
    fk_name = "organization"
    fields = ("user", "role", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        # Each row's title is the membership's str(), which names both ends.
        return super().get_queryset(request).select_related("user", "organization")

    def has_add_permission(self, request: HttpRequest, obj: Organization | None) -> bool:  # type: ignore[override]
        return False

    def has_change_permission(self, request: HttpRequest, obj: Organization | None = None) -> bool:
        return False


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
class OrganizationAdmin(OperableAdmin):
    """Made with its owner (``create_organization``) and edited with its members on form views; suspended from the
    list's actions. Deleting one is Django's own delete, which takes its rows with it."""

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
    fieldsets = (
        (None, {"fields": ("id", "name", "slug", "is_personal", "created_at")}),
        ("Limits", {"fields": ("concurrency_limit",)}),
        ("Status", {"fields": ("suspended_at",), "description": "Suspend or unsuspend from the list's actions."}),
    )
    inlines = (MembershipOfOrganizationInline, ApiKeyOfOrganizationInline)
    actions = ("suspend_selected", "unsuspend_selected")

    def get_urls(self) -> list[URLPattern]:
        return [
            self.form_view_path("create/", self.create_view, "create"),
            self.form_view_path("<path:object_id>/edit/", self.edit_view, "edit"),
            *super().get_urls(),
        ]

    def has_delete_permission(self, request: HttpRequest, obj: Organization | None = None) -> bool:
        return self.has_model_permission(request, "delete")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        related = [name for section in _organization_sections for name in section.related]
        return (
            super()
            .get_queryset(request)
            .select_related(*related)
            .annotate(
                member_count=_count_per_organization(Membership.objects.all()),
                active_key_count=_count_per_organization(ApiKey.objects.usable()),
            )
        )

    def get_list_display(self, request: HttpRequest) -> Any:
        columns: list[str | Callable[[Organization], Any]] = list(super().get_list_display(request))
        added = [column for section in _organization_sections for column in section.columns]
        return [*columns[:4], *added, *columns[4:]]

    def get_fieldsets(self, request: HttpRequest, obj: Organization | None = None) -> Any:
        sections = [(section.title, {"fields": section.fields}) for section in _organization_sections]
        return [*super().get_fieldsets(request, obj), *sections]

    def get_list_tools(self, request: HttpRequest) -> list[Tool]:
        if not self.has_create_permission(request):
            return []
        return [Tool("Add organization", self.form_view_url("create"))]

    def get_object_tools(self, request: HttpRequest, obj: Organization) -> list[Tool]:
        if not self.has_operate_permission(request):
            return []
        return [Tool("Edit name, limit and members", self.form_view_url("edit", obj.pk))]

    @admin.display(description="members", ordering="member_count")
    def member_count(self, organization: Organization) -> int:
        return int(organization.member_count)  # type: ignore[attr-defined]

    @admin.display(description="active keys", ordering="active_key_count")
    def active_key_count(self, organization: Organization) -> int:
        return int(organization.active_key_count)  # type: ignore[attr-defined]

    @admin.display(description="suspended", boolean=True, ordering="suspended_at")
    def suspended(self, organization: Organization) -> bool:
        return organization.is_suspended

    def create_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_create_permission(request):
            raise PermissionDenied
        form = OrganizationCreateForm(form_data(request))
        if form.is_valid():
            organization = create_organization(
                name=form.cleaned_data["name"], owner=form.cleaned_data["owner"], actor=request_actor(request)
            )
            self.log_addition(request, organization, [{"added": {}}])
            self.message_user(request, f"Added the organization {organization}.", messages.SUCCESS)
            return self.change_page(organization)
        return self.render_form_view(
            request,
            title="Add organization",
            form=form,
            intro="A team organization for a customer; more members are added on its edit page.",
            submit_label="Add organization",
        )

    def edit_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        organization: Organization = self.object_to_operate(request, object_id)
        data = form_data(request)
        form = OrganizationForm(data, instance=organization)
        members = MembershipFormSet(data, instance=organization, queryset=Membership.objects.select_related("user"))
        if all([form.is_valid(), members.is_valid()]):
            response = self._save(request, organization, form, members)
            if response is not None:
                return response
        return self.render_form_view(
            request,
            title="Edit name, limit and members",
            form=form,
            obj=organization,
            formset=members,
            formset_title="Members",
            intro="Fill the last row to add a member. An organization always keeps an owner: to hand it over, make "
            "the new owner owner and the old one something else in the same save.",
        )

    def _save(
        self,
        request: HttpRequest,
        organization: Organization,
        form: OrganizationForm,
        members: BaseInlineFormSet[Membership, Organization, Any],
    ) -> HttpResponse | None:
        """Saves a valid edit through the services; None when the limit was refused (the form shows why)."""
        actor = request_actor(request)
        if "concurrency_limit" in form.changed_data:
            try:
                set_concurrency_limit(
                    organization=organization, limit=form.cleaned_data["concurrency_limit"], actor=actor
                )
            except AccountsError as error:
                form.add_error("concurrency_limit", str(error))
                return None
        # Only the other edited columns: a full save would write back a suspended_at read before a concurrent
        # suspension, and the limit is the service's.
        columns = [name for name in form.changed_data if name != "concurrency_limit"]
        if columns:
            organization.save(update_fields=columns)
        refusals = _save_members(organization, members, actor)
        self.log_form_change(request, organization, form)
        for refusal in refusals:
            self.message_user(request, refusal, messages.ERROR)
        if refusals:
            return HttpResponseRedirect(self.form_view_url("edit", organization.pk))
        self.message_user(request, f"The organization {organization} was changed.", messages.SUCCESS)
        return self.change_page(organization)

    @admin.action(description="Suspend selected organizations", permissions=["operate"])
    def suspend_selected(self, request: HttpRequest, queryset: QuerySet[Organization]) -> None:
        self._set_suspended(request, queryset, suspended=True)

    @admin.action(description="Unsuspend selected organizations", permissions=["operate"])
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


def _save_members(
    organization: Organization, members: BaseInlineFormSet[Membership, Organization, Any], actor: Actor
) -> list[str]:
    """Adds the new members and changes roles through the services; returns why each refused row was refused."""
    members.save(commit=False)  # fills new_objects and changed_objects; the services write
    refusals = []
    for membership in members.new_objects:
        try:
            add_member(organization=organization, user=membership.user, role=membership.role, actor=actor)
        except AccountsError as error:
            refusals.append(f"{membership.user} was not added: {error}")
    # Promotions to owner first, so handing ownership over in one save is not refused as removing the last owner.
    role_changes = [membership for membership, changed in members.changed_objects if "role" in changed]
    for membership in sorted(role_changes, key=lambda m: m.role != Role.OWNER):
        try:
            change_member_role(membership=membership, role=membership.role, actor=actor)
        except AccountsError as error:
            refusals.append(f"{membership.user} keeps the role they had: {error}")
    return refusals


# --- Memberships --------------------------------------------------------------------------------------------


@admin.register(Membership)
class MembershipAdmin(OperableAdmin):
    """Members are added and given roles on their organization's edit page, and removed here (``remove_member``,
    which keeps an owner)."""

    list_display = ("user", "organization", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__email", "organization__name")
    fields = ("user", "organization", "role", "created_at")
    actions = ("remove_selected",)

    def get_urls(self) -> list[URLPattern]:
        return [self.form_view_path("<path:object_id>/remove/", self.remove_view, "remove"), *super().get_urls()]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        # A membership's str() and its page name both ends.
        return super().get_queryset(request).select_related("user", "organization")

    def get_object_tools(self, request: HttpRequest, obj: Membership) -> list[Tool]:
        if not self.has_operate_permission(request):
            return []
        return [
            Tool(
                "Change role", reverse(f"{self.admin_site.name}:accounts_organization_edit", args=[obj.organization_id])
            ),
            Tool("Remove from the organization", self.form_view_url("remove", obj.pk)),
        ]

    def remove_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        membership: Membership = self.object_to_operate(request, object_id)
        if request.method == "POST":
            try:
                remove_member(membership=membership, actor=request_actor(request))
            except AccountsError as error:
                message = f"{membership.user} was not removed from {membership.organization}: {error}"
                self.message_user(request, message, messages.ERROR)
                return self.change_page(membership)
            self.message_user(request, f"Removed {membership.user} from {membership.organization}.", messages.SUCCESS)
            return HttpResponseRedirect(self.form_view_url("changelist"))
        return self.render_form_view(
            request,
            title="Remove from the organization",
            form=forms.Form(),
            obj=membership,
            intro=f"{membership.user} will no longer have access to {membership.organization}.",
            refusal=" ".join(_orphaning_removals([membership])),
            submit_label="Remove",
        )

    @admin.action(description="Remove selected members from their organizations", permissions=["operate"])
    def remove_selected(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        actor = request_actor(request)
        removed = 0
        for membership in queryset.select_related("user", "organization"):
            try:
                remove_member(membership=membership, actor=actor)
            except AccountsError as error:
                message = f"{membership.user} was not removed from {membership.organization}: {error}"
                self.message_user(request, message, messages.ERROR)
            else:
                removed += 1
        self.message_user(request, f"Removed {removed} member(s).", messages.SUCCESS)


# --- API keys -----------------------------------------------------------------------------------------------


@admin.register(ApiKey)
class ApiKeyAdmin(OperableAdmin):
    """Made by the API and the dashboard, the only places that can show the secret once; edited here through
    ``update_api_key`` (which audits a change of rate or expiry) and revoked from the list's actions."""

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
    actions = ("revoke_selected",)

    def get_urls(self) -> list[URLPattern]:
        return [self.form_view_path("<path:object_id>/edit/", self.edit_view, "edit"), *super().get_urls()]

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        """Nobody deletes a key: it is revoked. Its jobs, holds, usage records and audit entries name it (which key
        spent what), its spend limit and its month's spend are read through it, and a delete while one of its jobs
        settles fails one of the two on the foreign key (or, won by the delete, the running job loses its key's
        limit at its next step). A revoked key stops working on its next request, on every process."""
        return False

    def get_object_tools(self, request: HttpRequest, obj: ApiKey) -> list[Tool]:
        if not self.has_operate_permission(request):
            return []
        return [Tool("Edit name, rate and expiry", self.form_view_url("edit", obj.pk))]

    @admin.display(description="status")
    def status(self, api_key: ApiKey) -> str:
        return api_key.status

    @admin.display(description="scopes")
    def scope_list(self, api_key: ApiKey) -> str:
        return ", ".join(api_key.scopes)

    def edit_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        api_key: ApiKey = self.object_to_operate(request, object_id)
        form = ApiKeyForm(form_data(request), instance=api_key)
        if form.is_valid():
            changes = {name: form.cleaned_data[name] for name in form.changed_data}
            try:
                update_api_key(api_key=api_key, actor=request_actor(request), **changes)
            except AccountsError as error:
                form.add_error(None, str(error))
            else:
                self.log_form_change(request, api_key, form)
                self.message_user(request, f"The key {api_key.name} was changed.", messages.SUCCESS)
                return self.change_page(api_key)
        return self.render_form_view(request, title="Edit name, rate and expiry", form=form, obj=api_key)

    @admin.action(description="Revoke selected keys", permissions=["operate"])
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
class AuditEventAdmin(OperableAdmin):
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
