"""Sign up, and the organization switcher. Log in, log out and password reset are Django's own views."""

from __future__ import annotations

from django.contrib.auth import login
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from accounts.services import Actor, sign_up
from dashboard.access import SESSION_KEY, resolve
from dashboard.forms import SignUpForm


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("dashboard:home")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = sign_up(
            email=form.cleaned_data["email"],
            password=form.cleaned_data["password"],
            name=form.cleaned_data["name"],
            actor=Actor(ip_address=request.META.get("REMOTE_ADDR")),
        )
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("dashboard:home")
    return render(request, "dashboard/auth/signup.html", {"form": form})


@require_POST
def switch_organization(request: HttpRequest) -> HttpResponse:
    context = resolve(request)
    wanted = request.POST.get("organization", "")
    if context is not None and any(str(m.organization_id) == wanted for m in context.memberships):
        request.session[SESSION_KEY] = wanted
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse("dashboard:home")
    return HttpResponseRedirect(target)
