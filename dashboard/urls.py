from django.contrib.auth import views as auth_views
from django.urls import path

from dashboard.views import auth, billing, invitations, requests, team, usage

app_name = "dashboard"

urlpatterns = [
    path("", usage.home, name="home"),
    path("organization", auth.switch_organization, name="switch-organization"),
    path("playground", requests.playground, name="playground"),
    path("playground/run", requests.playground_run, name="playground-run"),
    path("requests", requests.request_list, name="requests"),
    path("requests/<uuid:request_id>", requests.request_detail, name="request"),
    path("requests/<uuid:request_id>/events", requests.request_events, name="request-events"),
    path("requests/<uuid:request_id>/outcome", requests.request_outcome, name="request-outcome"),
    path("usage", usage.usage, name="usage"),
    path("keys", team.keys, name="keys"),
    path("keys/<uuid:key_id>/revoke", team.revoke_key, name="revoke-key"),
    path("members", team.members, name="members"),
    path("members/invite", team.invite, name="invite"),
    path("members/invitations/<int:invitation_id>/revoke", team.revoke_invitation_view, name="revoke-invitation"),
    path("members/<int:membership_id>/role", team.change_role, name="change-role"),
    path("members/<int:membership_id>/remove", team.remove, name="remove-member"),
    path("billing", billing.billing, name="billing"),
    path("billing/top-up", billing.top_up_settings, name="top-up-settings"),
    path("billing/buy", billing.buy_credits, name="buy-credits"),
    path("billing/cards/<str:payment_method_id>", billing.card_action, name="card"),
    path("billing/statements/<str:month>", billing.statement, name="statement"),
    path("billing/receipts/<int:receipt_id>", billing.receipt, name="receipt"),
    path("billing/payments/<int:payment_id>/receipt", billing.payment_receipt, name="payment-receipt"),
    path("billing/details", billing.billing_details, name="billing-details"),
    path("billing/spend", billing.spend_settings, name="spend-settings"),
    path("billing/keys/<uuid:key_id>/limit", billing.key_limit, name="key-limit"),
    path("billing/members/<int:user_id>/limit", billing.member_limit, name="member-limit"),
    path("billing/end-users/limit", billing.end_user_limit, name="end-user-limit"),
    path("billing/alerts/<int:alert_id>/dismiss", billing.dismiss_alert, name="dismiss-alert"),
]

auth_urlpatterns = [
    path("signup", auth.signup, name="signup"),
    path("signup/sent", auth.signup_sent, name="signup_sent"),
    path("signup/confirm/<str:token>", auth.signup_confirm, name="signup_confirm"),
    path("invitation", invitations.invitation, name="invitation"),
    path("invitation/<str:secret>", invitations.open_link, name="invitation_link"),
    path("login", auth.LoginView.as_view(), name="login"),
    path("logout", auth_views.LogoutView.as_view(), name="logout"),
    path("password-reset", auth.PasswordResetView.as_view(), name="password_reset"),
    path(
        "password-reset/sent",
        auth_views.PasswordResetDoneView.as_view(template_name="dashboard/auth/password_reset_done.html"),
        name="password_reset_done",
    ),
    path(
        "password-reset/<uidb64>/<token>",
        auth.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "password-reset/done",
        auth_views.PasswordResetCompleteView.as_view(template_name="dashboard/auth/password_reset_complete.html"),
        name="password_reset_complete",
    ),
]
