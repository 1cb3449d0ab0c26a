"""What the operators' console builds on: pages that only show rows, and form views that change them.

A row with a domain rule or an audit trail is changed only through a service. Its admin page is a view; an operator
changes it through an action on the list or through a form view: a page at its own admin URL (``get_urls``) whose
Django form, once valid, calls the service. The form view alone decides what the operator sees next (the form again
with the service's refusal, or a redirect with a message), as Django's own password-change page for users does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from django import forms
from django.contrib import admin
from django.contrib.admin.helpers import AdminForm
from django.contrib.admin.utils import quote, unquote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from accounts.models import User
from accounts.services import Actor

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.forms.formsets import BaseFormSet

    _ModelAdminBase = admin.ModelAdmin[Any]
else:
    # The stubs make ModelAdmin generic; Django's class takes no type arguments at runtime.
    _ModelAdminBase = admin.ModelAdmin


def request_actor(request: HttpRequest) -> Actor:
    """The operator behind an admin request, as the audit log records them."""
    user = request.user if isinstance(request.user, User) else None
    return Actor(user=user, ip_address=request.META.get("REMOTE_ADDR") or None)


def form_data(request: HttpRequest) -> Any:
    """What a form view's form is bound to: the posted data, or nothing (an unbound form) on a GET."""
    return request.POST if request.method == "POST" else None


class Tool(NamedTuple):
    """A link at the top right of a page (the admin's object tools) to a form view."""

    label: str
    url: str


class FormViewsAdmin(_ModelAdminBase):
    """A ModelAdmin with form views, linked from its list and its rows' pages as object tools.

    An operator may use the form views of a model when they may change it (``has_operate_permission``), and the ones
    that make a row when they may add it (``has_create_permission``); actions ask the same with
    ``permissions=["operate"]``.
    """

    change_list_template = "admin/change_list_with_tools.html"
    change_form_template = "admin/change_form_with_tools.html"
    form_view_template = "admin/form_view.html"

    def has_model_permission(self, request: HttpRequest, action: str) -> bool:
        """Whether the operator holds the model's own permission: ``add``, ``change``, ``delete`` or ``view``."""
        return request.user.has_perm(f"{self.opts.app_label}.{get_permission_codename(action, self.opts)}")

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return self.has_model_permission(request, "change")

    def has_create_permission(self, request: HttpRequest) -> bool:
        return self.has_model_permission(request, "add")

    def get_list_tools(self, request: HttpRequest) -> list[Tool]:
        """The form views linked from the list (making a row, for instance)."""
        return []

    def get_object_tools(self, request: HttpRequest, obj: Any) -> list[Tool]:
        """The form views linked from a row's page."""
        return []

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        context = {"tools": self.get_list_tools(request), **(extra_context or {})}
        return super().changelist_view(request, context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        obj = self.get_object(request, unquote(object_id))
        tools = [] if obj is None else self.get_object_tools(request, obj)
        return super().change_view(request, object_id, form_url, {"tools": tools, **(extra_context or {})})

    def form_view_path(self, route: str, view: Callable[..., HttpResponse], name: str) -> URLPattern:
        """A URL of this model's admin (``admin:<app>_<model>_<name>``) for a form view, behind the admin's login."""
        return path(
            route, self.admin_site.admin_view(view), name=f"{self.opts.app_label}_{self.opts.model_name}_{name}"
        )

    def form_view_url(self, name: str, *args: Any) -> str:
        return reverse(
            f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_{name}",
            args=[quote(arg) for arg in args],
        )

    def log_form_change(self, request: HttpRequest, obj: Any, form: forms.BaseForm) -> None:
        """Adds the change to the row's admin history (its History page), naming the fields the form changed."""
        if form.changed_data:
            self.log_change(request, obj, [{"changed": {"fields": [form[name].label for name in form.changed_data]}}])

    def change_page(self, obj: Any) -> HttpResponseRedirect:
        """A redirect to the row's own page."""
        return HttpResponseRedirect(self.form_view_url("change", obj.pk))

    def object_to_operate(self, request: HttpRequest, object_id: str) -> Any:
        """The row a form view acts on: 403 for an operator who may not change it, 404 when there is none."""
        if not self.has_operate_permission(request):
            raise PermissionDenied
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404(f"No {self.opts.verbose_name} with the id {object_id!r}.")
        return obj

    def render_form_view(
        self,
        request: HttpRequest,
        *,
        title: str,
        form: forms.BaseForm,
        obj: Any = None,
        formset: BaseFormSet[Any] | None = None,
        formset_title: str = "",
        intro: str = "",
        refusal: str = "",
        submit_label: str = "Save",
    ) -> TemplateResponse:
        """The page of a form view: ``intro`` above the form (and ``formset`` below it, as a table titled
        ``formset_title``), ``refusal`` instead of the submit button."""
        media = self.media + form.media
        if formset is not None:
            # Every row's: a formset's own media is its first row's, whose widgets may differ from a new row's.
            for row in [*formset.forms, formset.empty_form]:
                media += row.media
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.opts,
            "original": obj,
            "form": form,
            # Any form: the stubs ask for a ModelForm, but AdminForm only lays out the form's fields.
            "adminform": AdminForm(form, [(None, {"fields": list(form.fields)})], {}),  # type: ignore[arg-type]
            "formset": formset,
            "formset_title": formset_title,
            "media": media,
            "intro": intro,
            "refusal": refusal,
            "submit_label": submit_label,
            "back_url": self.form_view_url("change", obj.pk) if obj is not None else self.form_view_url("changelist"),
        }
        return TemplateResponse(request, self.form_view_template, context)


class OperableAdmin(FormViewsAdmin):
    """Rows that nobody adds, edits or deletes by hand: their pages are views, and operators act on them only through
    actions and form views."""

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
