from django.urls import path

from django_counter import views

urlpatterns = [
    path("lite/get", views.get_counter),
    path("lite/inc", views.increment),
]
